"""Fetch Chart.js from the npm registry and keep its UMD build for the
dashboard (a build step: the page never loads anything from the internet),
checked against a pinned hash.

Usage: python scripts/vendor_chartjs.py DEST
"""

from __future__ import annotations

import hashlib
import io
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


def main() -> None:
    dest = Path(sys.argv[1])
    try:
        with urllib.request.urlopen(URL, timeout=60) as r:
            raw = r.read()
    except OSError as exc:
        raise SystemExit(f"aattsfs: error: cannot fetch Chart.js from the npm registry "
                         f"({exc}); the dashboard needs it") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            js = tar.extractfile(MEMBER).read()
    except (tarfile.TarError, KeyError, AttributeError):
        raise SystemExit(f"aattsfs: error: the Chart.js {VERSION} download from {URL} is "
                         "not the npm package it should be; try again") from None
    digest = hashlib.sha256(js).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"aattsfs: error: Chart.js {VERSION} from {URL} hashes to "
                         f"{digest}, not the pinned {SHA256}; not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(js)
    print(f"vendored Chart.js {VERSION} ({len(js)} bytes, sha256 {digest[:16]}, as pinned) "
          f"into {dest}")


if __name__ == "__main__":
    main()
