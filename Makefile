# Two commands set everything up on a fresh machine with Python 3.11: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/executor.lock

.PHONY: demo test bench lint venv clean lock test-minimum sysdeps

venv: $(STAMP)

# The runtime dependencies come from the lock, exactly (versions and hashes): the executor's
# environment, and so its measurement, can be rebuilt. Dev tools are added on top.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Re-pin the runtime dependencies after a change to pyproject.toml's dependencies.
lock:
	test -x build/lockenv/bin/pip-compile || ($(PYTHON) -m venv build/lockenv && \
	  build/lockenv/bin/pip install --quiet pip-tools)
	build/lockenv/bin/pip-compile --quiet --generate-hashes --strip-extras --no-header \
	  --no-emit-index-url --no-emit-find-links \
	  --output-file $(LOCK) pyproject.toml

# The suite against pyproject.toml's lower bounds (requirements/minimum.txt), in its own venv.
# Old Starlette's test client warns under the newest anyio, so deprecations are not errors here.
test-minimum:
	test -x build/minenv/bin/python || $(PYTHON) -m venv build/minenv
	build/minenv/bin/python -m pip install --quiet -c requirements/minimum.txt -e '.[dev]'
	build/minenv/bin/python -m pytest -W ignore::DeprecationWarning \
	  --deselect tests/test_lock.py::test_the_installed_runtime_is_the_lock

# The user-code sandbox needs bubblewrap and libseccomp (Debian's packages); as root they are
# installed when missing, otherwise the tests that need them skip and user_code is refused
# with the reason.
sysdeps:
	@{ command -v bwrap && /sbin/ldconfig -p | grep -q libseccomp.so.2; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -y -qq bubblewrap libseccomp2; } || \
	  echo "bubblewrap or libseccomp missing: user_code will be refused"
	@# the dashboard's browser test drives Debian's headless Chromium (skipped without it)
	@{ test -x /usr/bin/chromium && command -v chromedriver; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -y -qq chromium chromium-driver; } || \
	  echo "chromium or chromium-driver missing: the dashboard's browser test is skipped"

demo: $(STAMP) sysdeps
	$(BIN)/teeflow demo

test: $(STAMP) sysdeps
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	@# four workers on two cores: most e2e tests wait on processes and sockets, not the CPU
	$(BIN)/python -m pytest -n 4  # pytest-xdist; plain `pytest` runs serially

bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
