"""The live dashboard in a real headless Chromium, while a workload runs:
the charts receive data and the numbers match .aatts/stats. A screenshot
goes to test-artifacts/dashboard.png."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import MiB, run_cli, wait_for

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium and chromedriver are missing; `make test` installs them")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_shows_live_data_matching_the_stats(cold_tree, mounter, browser):
    from test_service import _free_port
    port = _free_port()
    os.chmod(cold_tree / "big.bin", 0o644)  # any local user may read it: named
    os.chmod(cold_tree / "mid.bin", 0o640)  # not others: listed as (private)
    m = mounter(cold_tree, fast_size="16M", extra=["--metrics-address", f"127.0.0.1:{port}"])
    files = ["big.bin", "mid.bin", "models/a/weights.bin", "models/b/weights.bin"]
    stop = threading.Event()

    def workload():  # reads that hit, miss, promote and evict, and reach the daemon
        while not stop.is_set():
            for rel in files:
                with open(m.path(rel), "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    f.read()
            run_cli("evict", m.path("mid.bin"))

    worker = threading.Thread(target=workload)
    worker.start()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        points = "return window.aattsfsCharts.%s.data.labels.length"
        wait_for(lambda: all(browser.execute_script(points % c) >= 5
                             for c in ("hit", "latency", "bandwidth", "occupancy")),
                 what="five seconds of data in every chart")
        promoted = ("return window.aattsfsCharts.bandwidth.data.datasets[0].data"
                    ".some(v => v > 0)")
        assert browser.execute_script(promoted)  # promotion bandwidth was charted
        latency = "return window.aattsfsCharts.latency.data.datasets[0].data.some(v => v > 0)"
        wait_for(lambda: browser.execute_script(latency), what="read latencies charted")
        occupancy = browser.execute_script(
            "return window.aattsfsCharts.occupancy.data.datasets[1].data.at(-1)")
        assert occupancy == 16  # the budget line, MiB
    finally:
        stop.set()
        worker.join()
    # once the workload stops, the page's numbers are the daemon's (polled
    # each second: wait until a poll has caught up with a fresh read)
    def shown(element_id):
        return browser.find_element("id", element_id).text

    def same():
        s = m.stats()
        pt = s["passthrough"]
        return ((shown("promotions"), shown("fast-files")) ==
                (str(s["promotions"]), str(s["fast_tier"]["files"]))
                and shown("passthrough").startswith(
                    f"on, {pt['opens']} opens (" if pt["active"] else "off"))

    wait_for(same, what="the page to show what .aatts/stats says")
    assert int(browser.find_element("id", "budget").get_attribute("data-bytes")) == 16 * MiB
    hot = [row.text for row in browser.find_elements("css selector", "#hot tr")]
    assert any("big.bin" in row for row in hot) and len(hot) >= len(files)
    assert any("(private)" in row for row in hot)
    assert not any("mid.bin" in row for row in hot)
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def test_a_chartjs_download_that_does_not_hash_as_pinned_is_refused(tmp_path, monkeypatch):
    """The build step keeps Chart.js only if it is the pinned file: a
    tampered or damaged download stops it with one line, nothing written."""
    import io
    import sys
    import tarfile
    import urllib.request
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import vendor_chartjs

    def package(js: bytes) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            info = tarfile.TarInfo(vendor_chartjs.MEMBER)
            info.size = len(js)
            tar.addfile(info, io.BytesIO(js))
        return out.getvalue()

    monkeypatch.delenv(vendor_chartjs.LOCAL_ENV, raising=False)
    for raw in (package(b"window.Chart = evil;"), b"not a tarball"):
        monkeypatch.setattr(urllib.request, "urlopen",
                            lambda *a, raw=raw, **k: io.BytesIO(raw))
        dest = tmp_path / "chart.umd.js"
        monkeypatch.setattr(sys, "argv", ["vendor_chartjs.py", str(dest)])
        with pytest.raises(SystemExit) as exc:
            vendor_chartjs.main()
        assert str(exc.value).startswith("aattsfs: error: ") and "\n" not in str(exc.value)
        assert not dest.exists()
