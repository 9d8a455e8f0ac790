"""The package as a user gets it: an sdist of this checkout, a wheel built
from that sdist (what `python -m build` and `pip install` of an sdist do),
and the wheel installed into a fresh virtual environment that sees neither
the checkout nor the dev environment. From there `aattsfs --version`,
`install-unit` and a real mount serving the dashboard with the pinned
Chart.js must work (docs/install.md).

The wheel is built once per session. pyfuse3 has no wheel on PyPI and takes
about a minute to build, so the fresh environment gets the pyfuse3 wheel
that scripts/build-libfuse.sh built for the dev environment (or pip's,
cached, build of the sdist); everything else comes from the package index.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import MiB, wait_for, write_random

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import vendor_chartjs  # noqa: E402

PYFUSE3 = "pyfuse3==3.5.0"  # as setup.cfg pins it


def _env(**extra) -> dict:
    """This environment minus what would lead Python to the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             + "\n".join(out[-30:]))
    return proc


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """(sdist, wheel) of this checkout, the wheel built from the sdist."""
    # not find_spec("build"): the checkout's build/ directory is a namespace package
    if importlib.util.find_spec("build.__main__") is None:
        pytest.fail("the 'build' package is missing; `make test` installs it (.[dev])")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ)  # the build frontend of this environment (the backend is isolated)
    # the checkout's vendored Chart.js (make vendors it) spares a download at
    # each run; held to the same pin. Without it the build fetches it.
    vendored = REPO / "aattsfs" / "static" / "chart.umd.js"
    if vendor_chartjs.is_pinned(vendored):
        env[vendor_chartjs.LOCAL_ENV] = str(vendored)
    # the passthrough extension against the libfuse pyfuse3 links to, as make does
    if (REPO / "build" / "libfuse" / "include").is_dir():
        env["CFLAGS"] = f"-I{REPO / 'build' / 'libfuse' / 'include'}"
    _run([sys.executable, "-m", "build", "--outdir", out, REPO], env=env, cwd=out)
    sdists, wheels = list(out.glob("aattsfs-*.tar.gz")), list(out.glob("aattsfs-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(out.iterdir())
    return sdists[0], wheels[0]


@pytest.fixture(scope="session")
def pyfuse3_wheel(tmp_path_factory) -> Path:
    built = sorted((REPO / "build" / "libfuse.work").glob("pyfuse3-*/pyfuse3-*.whl"))
    if built:
        return built[-1]
    out = tmp_path_factory.mktemp("pyfuse3")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, PYFUSE3],
         env=_env())
    return next(out.glob("pyfuse3-*.whl"))


@pytest.fixture(scope="session")
def venv(tmp_path_factory, dist, pyfuse3_wheel):
    """A fresh virtual environment with the wheel installed (no system site
    packages, no dev environment)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    _run([*pip, "--no-deps", pyfuse3_wheel], env=_env(), cwd=venv)
    _run([*pip, dist[1]], env=_env(), cwd=venv)
    yield venv
    shutil.rmtree(venv)  # 40 MiB that pytest would keep for three sessions


def test_the_sdist_builds_a_wheel_that_carries_the_unit_and_chartjs(dist):
    sdist, wheel = dist
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # what its wheel is built from, and no third-party code
    assert {"pyproject.toml", "setup.cfg", "scripts/build_hooks.py",
            "scripts/vendor_chartjs.py", "aattsfs/_passthrough.c",
            "aattsfs/static/dashboard.html", "aattsfs/systemd/aattsfs@.service",
            "aattsfs/systemd/example.toml"} <= in_sdist
    assert "aattsfs/static/chart.umd.js" not in in_sdist
    assert not any(n.endswith(".so") for n in in_sdist)
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert {"aattsfs/static/dashboard.html", "aattsfs/systemd/aattsfs@.service",
                "aattsfs/systemd/example.toml", "aattsfs/cli.py"} <= names
        js = whl.read("aattsfs/static/chart.umd.js")
        assert hashlib.sha256(js).hexdigest() == vendor_chartjs.SHA256
        for name in ("aattsfs@.service", "example.toml"):  # the checkout's, byte for byte
            assert whl.read(f"aattsfs/systemd/{name}") == \
                (REPO / "systemd" / name).read_bytes()
    assert not any(n.startswith(("scripts/", "tests/")) for n in names)
    # top-level systemd/ only points into the package: one copy of each file
    for name in ("aattsfs@.service", "example.toml"):
        link = REPO / "systemd" / name
        assert link.is_symlink() and link.resolve() == REPO / "aattsfs" / "systemd" / name


def test_the_installed_wheel_runs_and_installs_its_unit(venv, tmp_path):
    from aattsfs import __version__
    aattsfs = venv / "bin" / "aattsfs"
    py = venv / "bin" / "python"
    # the package and its runtime dependencies, from the venv only
    where = _run([py, "-c", "import aattsfs, pyfuse3; print(aattsfs.__file__)"],
                 env=_env(), cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where
    assert _run([py, "-c", "import importlib.util as u; "
                 "print([m for m in ('torch', 'pytest', 'selenium', 'transformers') "
                 "if u.find_spec(m)])"], env=_env(), cwd=tmp_path).stdout.strip() == "[]"
    assert _run([aattsfs, "--version"], env=_env(), cwd=tmp_path).stdout \
        == f"aattsfs, version {__version__}\n"
    out = _run([aattsfs, "install-unit", "--unit-dir", tmp_path / "units", "--config-dir",
                tmp_path / "conf"], env=_env(), cwd=tmp_path).stdout
    assert str(tmp_path / "units" / "aattsfs@.service") in out
    unit = (tmp_path / "units" / "aattsfs@.service").read_text()
    conf = f"{tmp_path}/conf/%i.toml"
    assert f"ConditionPathExists={conf}\n" in unit
    assert f"\nExecStart={aattsfs} mount --config {conf} --foreground\n" in unit
    assert f"\nExecStop=-{aattsfs} umount --config {conf}\n" in unit
    assert (tmp_path / "conf" / "example.toml").read_bytes() == \
        (REPO / "aattsfs" / "systemd" / "example.toml").read_bytes()


def test_the_installed_wheel_serves_the_dashboard_and_its_chartjs(venv, mounter, tmp_path):
    from test_service import _free_port
    write_random(tmp_path / "cold" / "model.bin", MiB, 1)
    port = _free_port()
    m = mounter(tmp_path / "cold", command=[venv / "bin" / "aattsfs"],
                env={"PYTHONPATH": None}, extra=["--metrics-address", f"127.0.0.1:{port}"])
    assert m.path("model.bin").read_bytes() == (tmp_path / "cold" / "model.bin").read_bytes()

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError:
            raise
        except OSError:  # not listening yet
            return None

    status, ctype, page = wait_for(lambda: get("/"), what="the dashboard to be served")
    assert status == 200 and ctype.startswith("text/html")
    assert b'<script src="/chart.umd.js">' in page
    status, ctype, js = get("/chart.umd.js")
    assert status == 200 and "javascript" in ctype
    assert hashlib.sha256(js).hexdigest() == vendor_chartjs.SHA256


def test_a_local_chartjs_for_the_build_is_held_to_the_pin(tmp_path, monkeypatch):
    """$AATTSFS_CHARTJS replaces the download, not the check."""
    bad = tmp_path / "bad.js"
    bad.write_bytes(b"window.Chart = evil;")
    dest = tmp_path / "out" / "chart.umd.js"
    monkeypatch.setenv(vendor_chartjs.LOCAL_ENV, str(bad))
    with pytest.raises(SystemExit) as exc:
        vendor_chartjs.vendor(dest)
    message = str(exc.value)
    assert message.startswith("aattsfs: error: ") and "\n" not in message
    assert str(bad) in message and "pinned" in message
    assert not dest.exists()
    good = REPO / "aattsfs" / "static" / "chart.umd.js"
    if not vendor_chartjs.is_pinned(good):
        pytest.skip("the checkout has no vendored Chart.js (make vendors it)")
    monkeypatch.setenv(vendor_chartjs.LOCAL_ENV, str(good))
    vendor_chartjs.vendor(dest)
    assert dest.read_bytes() == good.read_bytes()
