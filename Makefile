# The two set-up commands: `make lab` and `make test`. Both install what is missing first
# (Debian packages with apt-get, igops into a virtualenv, `igops` on PATH), so they work on a
# fresh machine. `make install` does only the last two.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
IGOPS := $(VENV)/bin/igops
LAB_CONFIG ?= /var/lib/igops-lab/igops.toml
# Where `igops` is linked, so that the docs' bare `igops` (and cron's /usr/local/bin/igops) work.
BINDIR ?= /usr/local/bin
PYTEST_ARGS ?=
UNIT_WORKERS ?= auto

DEBIAN_PACKAGES := openssh-server openssh-client postgresql-15 postgresql-15-repmgr \
	postgresql-client-15 pgbouncer redis-server redis-tools nginx-light memcached munin-node munin \
	xfsprogs vmtouch pssh util-linux procps iproute2 curl etcd-server etcd-client pgbackrest openssl

.PHONY: lab test down deps venv install link bench clean

lab: deps install
	$(IGOPS) lab up
	$(IGOPS) -c $(LAB_CONFIG) status

# ruff and mypy first (configured in pyproject.toml): a lint finding, an unformatted file or a
# type error fails the run before the long tests. The unit tests run on every core (pytest-xdist:
# none shares a file, a port or the lab); the lab's tests, one at a time, since they share one lab.
test: deps install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n $(UNIT_WORKERS) tests/unit $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest tests/integration tests/reliability $(PYTEST_ARGS)

down: venv
	$(IGOPS) lab down

# Every benchmark in turn (root; about half an hour). The lab-backed ones need `make lab` first.
BENCHES := cli_startup inventory_load exec_fanout exec_client snapshot_freeze warm failover shard_move deploy check operations restore

bench: deps venv
	set -e; for bench in $(BENCHES); do echo "== bench/$$bench.py"; $(VENV)/bin/python bench/$$bench.py; done

deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

# The editable install's modules are compiled here: an environment with PYTHONDONTWRITEBYTECODE
# set never writes their .pyc files, and every igops run then compiled the forty-odd modules it
# imports from source again (some 80 ms of each command's start). Only stale files are rewritten.
install: venv link
	$(VENV)/bin/python -m compileall -q igops app

# $(BINDIR)/igops -> this checkout's .venv/bin/igops (its shebang names the venv's python, so
# the link runs igops with every dependency). Another igops there that is not a link is left
# alone; a directory we cannot write to (not root) is a note, not a failure.
link:
	@target="$(abspath $(VENV))/bin/igops"; link="$(BINDIR)/igops"; \
	if [ -e "$$link" ] && [ ! -L "$$link" ]; then \
		echo "note: $$link exists and is not a link: left alone (run $$target, or remove it)"; \
	elif [ "$$(readlink "$$link")" = "$$target" ]; then \
		:; \
	elif ln -sfn "$$target" "$$link" 2>/dev/null; then \
		echo "igops on PATH: $$link -> $$target"; \
	else \
		echo "note: cannot write $(BINDIR) (not root?): run $$target, or link it yourself"; \
	fi

$(VENV)/.installed: pyproject.toml app/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "igops needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' -r app/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
