"""Fetch Chart.js from the npm registry and keep its UMD build for the
dashboard (a build step: the page never loads anything from the internet),
checked against a pinned hash.

Usage: python scripts/vendor_chartjs.py DEST

The package build (scripts/build_hooks.py) calls `vendor` too: one copy of
the pin and the checks, whoever runs them. Standard library only, since it
runs inside a build environment that has nothing else.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "4.4.1"
URL = f"https://registry.npmjs.org/chart.js/-/chart.js-{VERSION}.tgz"
MEMBER = "package/dist/chart.umd.js"
# What this version's UMD build hashes to: a download that differs (a
# tampered registry or mirror, a truncated transfer) is refused, not shipped
SHA256 = "74401d738dd3e03ee5dfb3b6841210fe2c4ead8a960c4011ca4ba0b78a9fd8f3"
# A file to take instead of the download (an offline build, a test that
# builds the package repeatedly); held to the same pin
LOCAL_ENV = "AATTSFS_CHARTJS"


def is_pinned(path: Path) -> bool:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() == SHA256
    except OSError:
        return False


def fetch() -> bytes:
    """The pinned chart.umd.js, from $AATTSFS_CHARTJS or the npm registry;
    SystemExit with one line if it cannot be had as pinned."""
    local = os.environ.get(LOCAL_ENV)
    if local:
        try:
            js = Path(local).read_bytes()
        except OSError as exc:
            raise SystemExit(f"aattsfs: error: cannot read Chart.js from {LOCAL_ENV}={local} "
                             f"({exc.strerror})") from None
        source = local
    else:
        try:
            with urllib.request.urlopen(URL, timeout=60) as r:
                raw = r.read()
        except OSError as exc:
            raise SystemExit(f"aattsfs: error: cannot fetch Chart.js from the npm registry "
                             f"({exc}); the dashboard needs it (or set {LOCAL_ENV} to a "
                             "copy of chart.umd.js)") from None
        try:
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                js = tar.extractfile(MEMBER).read()
        except (tarfile.TarError, KeyError, AttributeError):
            raise SystemExit(f"aattsfs: error: the Chart.js {VERSION} download from {URL} is "
                             "not the npm package it should be; try again") from None
        source = URL
    digest = hashlib.sha256(js).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"aattsfs: error: Chart.js {VERSION} from {source} hashes to "
                         f"{digest}, not the pinned {SHA256}; not installed")
    return js


def vendor(dest: Path) -> None:
    js = fetch()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(js)
    tmp.replace(dest)  # never a half-written file under the served name
    print(f"vendored Chart.js {VERSION} ({len(js)} bytes, sha256 {SHA256[:16]}, as pinned) "
          f"into {dest}")


def main() -> None:
    vendor(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
