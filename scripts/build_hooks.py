"""setuptools commands that put the dashboard's Chart.js into the package
at build time (setup.cfg names them in `cmdclass`; docs/install.md says why
this way).

`build_chartjs` is a sub-command of `build`, after build_py: it writes the
pinned chart.umd.js into the build directory, from the checkout's vendored
copy when that hashes as pinned, else through scripts/vendor_chartjs.py
(the npm registry, or $AATTSFS_CHARTJS). setuptools puts the source files a
build sub-command names into the sdist, so an sdist carries this file and
vendor_chartjs.py and builds its wheel by itself. Chart.js itself is
excluded from the package data (setup.cfg) and from sdists (`Sdist`): it
ends up in wheels only, and always as pinned.

Loaded by path from a build environment: the standard library and
setuptools only (never the aattsfs package, which needs its dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Command
from setuptools.command.build import build
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
TARGET = os.path.join("aattsfs", "static", "chart.umd.js")  # relative to a tree


def _vendor_chartjs():
    spec = importlib.util.spec_from_file_location("vendor_chartjs", HERE / "vendor_chartjs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Build(build):
    sub_commands = build.sub_commands + [("build_chartjs", None)]


class Sdist(sdist):
    """An sdist without Chart.js even when an older aattsfs.egg-info lists
    it: setuptools carries over every file an earlier SOURCES.txt names."""

    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, [f for f in files if os.path.normpath(f) != TARGET])


class BuildChartJS(Command):
    """Put the pinned Chart.js into the package being built."""

    description = "vendor the dashboard's Chart.js (pinned by sha256)"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _dest(self) -> str:
        # an editable install serves the source tree: Chart.js goes there
        return TARGET if self.editable_mode else os.path.join(self.build_lib, TARGET)

    def run(self) -> None:
        vendor = _vendor_chartjs()
        dest = self._dest()
        if vendor.is_pinned(dest):
            return
        if not self.editable_mode and vendor.is_pinned(TARGET):  # the checkout's copy
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(TARGET, dest)
            return
        vendor.vendor(Path(dest))

    # the SubCommand protocol of setuptools (editable installs, sdist contents)
    def get_outputs(self) -> list[str]:
        return [self._dest()]

    def get_output_mapping(self) -> dict[str, str]:
        return {}  # generated, not copied from a source file

    def get_source_files(self) -> list[str]:
        return ["scripts/build_hooks.py", "scripts/vendor_chartjs.py"]
