"""Fetch Chart.js from the npm registry and keep its UMD build for the
dashboard (a build step: the page never loads anything from the internet).

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


def main() -> None:
    dest = Path(sys.argv[1])
    try:
        with urllib.request.urlopen(URL, timeout=60) as r:
            raw = r.read()
    except OSError as exc:
        raise SystemExit(f"aattsfs: error: cannot fetch Chart.js from the npm registry "
                         f"({exc}); the dashboard needs it") from None
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        js = tar.extractfile(MEMBER).read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(js)
    print(f"vendored Chart.js {VERSION} ({len(js)} bytes, sha256 "
          f"{hashlib.sha256(js).hexdigest()[:16]}) into {dest}")


if __name__ == "__main__":
    main()
