#!/usr/bin/env bash
# Install the system packages aattsfs needs, only if something is missing.
# Idempotent; needs root (or sudo) only when it has to install.
set -euo pipefail

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || missing+=(libfuse3-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v getfattr >/dev/null || missing+=(attr)
command -v gcc >/dev/null || missing+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
case "${1:-}" in
  --test)  # the dashboard test drives a real headless browser
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    command -v bindfs >/dev/null || missing+=(bindfs) ;;  # the bench suite's peer
  --bench)  # the benchmark suite's FUSE passthrough peer and its slow cold tier
    command -v bindfs >/dev/null || missing+=(bindfs)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v losetup >/dev/null || missing+=(mount) ;;
esac

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null; then
  sudo="sudo"
else
  echo "aattsfs: error: missing system packages (${missing[*]}); run 'make' as root or install them with apt-get" >&2
  exit 2
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
