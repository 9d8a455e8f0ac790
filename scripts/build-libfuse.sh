#!/usr/bin/env bash
# build-libfuse.sh PREFIX VENV: give VENV a pyfuse3 linked to a libfuse that
# knows FUSE passthrough (3.17 or later); docs/passthrough.md says why.
#
#  - The system's libfuse, when it is 3.17 or later: nothing to build.
#  - Otherwise Debian trixie's *source* package of fuse3 (pinned, checked by
#    sha256), fetched with a private apt configuration (the system's apt
#    sources and lists stay untouched), patched with Debian's own series,
#    built with meson (PyPI) and ninja (Debian) into PREFIX; then pyfuse3
#    from its sdist, built against it with PREFIX/lib as rpath, into VENV.
#
# Idempotent and cached: each step is skipped while its inputs are unchanged
# (downloads in PREFIX.work/dl, re-checked by sha256). PREFIX is replaced as
# a whole, never half-installed. Writes PREFIX/libfuse.env (what was used).
set -euo pipefail
umask 022
[ $# -eq 2 ] || { echo "usage: $0 PREFIX VENV" >&2; exit 2; }

FUSE3_SUITE=trixie
FUSE3_DEB_VERSION=3.17.2-3
FUSE3_ORIG_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
FUSE3_DEBIAN_SHA256=eaf7a177761ae8bf99ea97619f2cccf83f169b4f000e17b6106834e69456b5a2
MESON_VERSION=1.12.1
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_BUILD_REQS="setuptools==84.2.1 setuptools_scm==10.3.4 Cython==3.3.1"
MESON_OPTS=(--libdir=lib --buildtype=debugoptimized
            -Dutils=false -Dexamples=false -Dtests=false -Ddisable-mtab=true)

PREFIX=$(realpath -m -- "$1")
VENV=$(realpath -m -- "$2")
WORK=$PREFIX.work
SCRIPT=$(realpath -- "${BASH_SOURCE[0]}")
PYTHON=${PYTHON:-python3}
die() { printf 'aattsfs: error: building libfuse: %s\n' "$*" >&2; exit 2; }
log() { printf 'build-libfuse: %s\n' "$*" >&2; }
# pip, minus the warnings about configured local index directories that do not exist
pipq() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum <"$1" | cut -d' ' -f1)" = "$2" ]; }
[ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV"
mkdir -p "$WORK"
exec 9>"$WORK/.lock"; flock 9  # one build at a time

apt_install() {
  [ $# -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "missing packages ($*); run make as root or apt-get install them"
    sudo=sudo
  fi
  log "installing system packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || die "apt-get update failed"
  $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

# ---- the system's libfuse, when new enough ------------------------------
sysver=$(env -u PKG_CONFIG_PATH -u PKG_CONFIG_LIBDIR pkg-config --modversion fuse3 2>/dev/null || true)
if [ -n "$sysver" ] && env -u PKG_CONFIG_PATH -u PKG_CONFIG_LIBDIR pkg-config --atleast-version=3.17 fuse3; then
  log "the system's libfuse $sysver knows passthrough: nothing to build"
  mkdir -p "$PREFIX"
  printf 'LIBFUSE_SOURCE=system\nLIBFUSE_VERSION=%s\n' "$sysver" >"$PREFIX/libfuse.env"
  exit 0
fi

missing=()
command -v patch >/dev/null || missing+=(patch)
command -v xz >/dev/null || missing+=(xz-utils)
command -v ninja >/dev/null || missing+=(ninja-build)
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
apt_install "${missing[@]}"

BUILD_KEY=$( { cat "$SCRIPT"; gcc -dumpfullversion; ninja --version; echo "$PREFIX"; } | sha256sum | cut -c1-16)

# ---- Debian's source package, through a private apt configuration -------
upstream=${FUSE3_DEB_VERSION%-*}
DL=$WORK/dl
ORIG=$DL/fuse3_$upstream.orig.tar.gz
DEBTAR=$DL/fuse3_$FUSE3_DEB_VERSION.debian.tar.xz
fetch_source() {
  local A=$WORK/apt
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$DL"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${DEBIAN_MIRROR:-http://deb.debian.org/debian} $FUSE3_SUITE main" >"$A/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$A/sources.list" -o Dir::Etc::sourceparts=/dev/null
              -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o Acquire::Languages=none)
  apt-get "${opts[@]}" -q update >"$WORK/apt.log" 2>&1 || { tail -5 "$WORK/apt.log" >&2; return 1; }
  # apt's sandbox user must be able to write the download directory
  if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt:root "$DL"; fi
  (cd "$DL" && apt-get "${opts[@]}" -q source --download-only "fuse3=$FUSE3_DEB_VERSION") >>"$WORK/apt.log" 2>&1 \
    || { tail -5 "$WORK/apt.log" >&2; return 1; }
  rm -rf "$A"  # the index is only needed to fetch: the files are pinned by sha256
}
if ! { sha_ok "$ORIG" "$FUSE3_ORIG_SHA256" && sha_ok "$DEBTAR" "$FUSE3_DEBIAN_SHA256"; }; then
  log "fetching Debian's source package fuse3 $FUSE3_DEB_VERSION ($FUSE3_SUITE)"
  fetch_source || die "could not fetch fuse3=$FUSE3_DEB_VERSION from Debian $FUSE3_SUITE (set DEBIAN_MIRROR, or LIBFUSE=system to go without passthrough)"
  sha_ok "$ORIG" "$FUSE3_ORIG_SHA256" || die "sha256 mismatch: $ORIG"
  sha_ok "$DEBTAR" "$FUSE3_DEBIAN_SHA256" || die "sha256 mismatch: $DEBTAR"
fi

# ---- build and install the library into PREFIX -------------------------
build_libfuse() {
  local tools=$WORK/tools src=$WORK/src build=$WORK/build stage=$WORK/stage
  if [ "$("$tools/bin/meson" --version 2>/dev/null)" != "$MESON_VERSION" ]; then
    rm -rf "$tools"
    "$PYTHON" -m venv "$tools"
    pipq "$tools/bin/pip" install -q --disable-pip-version-check "meson==$MESON_VERSION"
  fi
  rm -rf "$src" "$build" "$stage"; mkdir -p "$src"
  tar -xzf "$ORIG" -C "$src" --strip-components=1
  tar -xJf "$DEBTAR" -C "$src" debian/patches
  local name opts
  while read -r name opts; do
    case "$name" in ''|'#'*) continue ;; esac
    # shellcheck disable=SC2086
    patch -d "$src" ${opts:--p1} --batch --forward --quiet <"$src/debian/patches/$name" \
      || die "Debian's patch $name does not apply"
  done <"$src/debian/patches/series"
  "$tools/bin/meson" setup "$build" "$src" --prefix="$PREFIX" "${MESON_OPTS[@]}" >"$WORK/build.log" 2>&1 \
    && ninja -C "$build" >>"$WORK/build.log" 2>&1 \
    && DESTDIR=$stage "$tools/bin/meson" install -C "$build" --no-rebuild >>"$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log" >&2; die "the build failed (log: $WORK/build.log)"; }
  rm -rf "$PREFIX.new" "$PREFIX"
  mv "$stage$PREFIX" "$PREFIX"
  rm -rf "$src" "$build" "$stage"
  echo "$BUILD_KEY" >"$PREFIX/.build-key"
}
if [ "$(cat "$PREFIX/.build-key" 2>/dev/null)" = "$BUILD_KEY" ] && [ -e "$PREFIX/lib/libfuse3.so" ]; then
  log "libfuse $upstream already built in $PREFIX"
else
  log "building libfuse $upstream into $PREFIX"
  build_libfuse
fi
grep -q 'define FUSE_CAP_PASSTHROUGH' "$PREFIX/include/fuse3/fuse_common.h" || die "$PREFIX's headers lack FUSE_CAP_PASSTHROUGH"

# ---- pyfuse3 from its sdist, against PREFIX, into VENV ------------------
SDIST=$DL/pyfuse3-$PYFUSE3_VERSION.tar.gz
if ! sha_ok "$SDIST" "$PYFUSE3_SHA256"; then
  # --no-binary pyfuse3 only (":all:" would build Cython from source too)
  pipq "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary pyfuse3 \
    -d "$DL" "pyfuse3==$PYFUSE3_VERSION" || die "could not download the pyfuse3 sdist"
  sha_ok "$SDIST" "$PYFUSE3_SHA256" || die "sha256 mismatch: $SDIST"
fi
PYKEY=$( { echo "$BUILD_KEY $PYFUSE3_BUILD_REQS"; "$VENV/bin/python" -c 'import sys; print(sys.version, sys.base_prefix)'; } \
         | sha256sum | cut -c1-16)
WHEELDIR=$WORK/pyfuse3-$PYKEY
if ! compgen -G "$WHEELDIR/pyfuse3-*.whl" >/dev/null; then
  log "building pyfuse3 $PYFUSE3_VERSION against it"
  rm -rf "$WORK"/pyfuse3-* "$WORK/pybuild"
  "$VENV/bin/python" -m venv "$WORK/pybuild"
  # shellcheck disable=SC2086
  pipq "$WORK/pybuild/bin/pip" install -q --disable-pip-version-check $PYFUSE3_BUILD_REQS
  # --no-cache-dir: pip's wheel cache is keyed by the sdist alone and would
  # hand back a pyfuse3 built earlier against the system's libfuse
  PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig LDFLAGS="-Wl,-rpath,$PREFIX/lib" \
    "$WORK/pybuild/bin/pip" wheel -q --disable-pip-version-check --no-cache-dir --no-build-isolation \
      --no-deps -w "$WHEELDIR.tmp" "$SDIST" >"$WORK/pyfuse3.log" 2>&1 \
    || { grep -v 'is ignored' "$WORK/pyfuse3.log" | tail -20 >&2; die "building pyfuse3 failed (log: $WORK/pyfuse3.log)"; }
  mv "$WHEELDIR.tmp" "$WHEELDIR"
  rm -rf "$WORK/pybuild"
fi
linked() {  # the libfuse the venv's pyfuse3 maps when imported
  "$VENV/bin/python" -c 'import sys, pyfuse3
print(next((l.split()[-1] for l in open("/proc/self/maps") if "libfuse3" in l), ""))' 2>/dev/null || true
}
case "$(linked)" in
  "$PREFIX"/lib/*) ;;
  *) whl=("$WHEELDIR"/pyfuse3-*.whl)
     # --force-reinstall: a pyfuse3 of the same version from PyPI would "satisfy" it
     pipq "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "${whl[0]}"
     pipq "$VENV/bin/pip" install -q --disable-pip-version-check "${whl[0]}" ;;
esac
case "$(linked)" in
  "$PREFIX"/lib/*) ;;
  *) die "pyfuse3 in $VENV does not load $PREFIX's libfuse ($(linked))" ;;
esac
printf 'LIBFUSE_SOURCE=built\nLIBFUSE_VERSION=%s\nLIBFUSE_INCLUDE=%s\n' "$upstream" "$PREFIX/include" >"$PREFIX/libfuse.env"
log "pyfuse3 uses libfuse $upstream from $PREFIX"
