# directfs: `make demo` runs the tour, `make test` runs everything CI runs. Both install what is missing first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Debian packages: FUSE runtime + headers to build pyfuse3, ffmpeg/sqlite3 for the demo and mount tests,
# nginx + apache with WebDAV for the webdav:// tests, shellcheck and systemd-analyze (package systemd) to check the
# container entrypoint and the unit file, rsync for the --rw mount tests (rsync -a into a mount).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc ffmpeg sqlite3 \
	nginx-light libnginx-mod-http-dav-ext apache2 apache2-utils shellcheck systemd rsync
PYTEST_ARGS ?=

.PHONY: all system-deps venv lint typecheck test demo bench clean

all: test

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: system-deps $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check directfs tests benchmarks
	$(VENV)/bin/ruff format --check directfs tests benchmarks
	$(VENV)/bin/lint-imports --no-cache  # the layering contracts of pyproject.toml ([tool.importlinter])

typecheck: venv
	$(VENV)/bin/mypy directfs

test: venv lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv
	$(PY) -m directfs.demo $(if $(MOUNTPOINT),--mountpoint $(MOUNTPOINT),)

bench: venv
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
