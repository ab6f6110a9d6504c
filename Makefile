# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test debs chromium lint format bench-deps bench clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e client -e '.[test]'
	touch $(STAMP)

# The service learning live: openpi-rl daemon (server, bridge, learner), two simulated MuJoCo
# robots and a simulated operator at the pendant, for 5 minutes (`openpi-rl demo --help`).
demo: $(STAMP)
	$(VENV)/bin/openpi-rl demo --minutes 5

# Tests drive Debian's chromium (the pendant page; no browser download), prometheus (scraping
# the services) and systemd (systemd-analyze verify on the units): whichever is missing is
# installed here, in one apt-get.
# Mesa's EGL renders MuJoCo's episode videos without a display (openpi-rl eval, the demo).
# FFmpeg's libraries decode videos for LeRobot's loader (torchcodec; tests/replay/test_lerobot.py).
# PostgreSQL's server: the replay's PostgreSQL backend is tested on a throw-away cluster
# (replay/pg_cluster.py; the package's own cluster is not used).
DEBS := chromium=/usr/bin/chromium prometheus=/usr/bin/prometheus systemd=/usr/bin/systemd-analyze \
	libegl-mesa0=/usr/share/glvnd/egl_vendor.d/50_mesa.json libgl1-mesa-dri=/usr/share/bug/libgl1-mesa-dri \
	ffmpeg=/usr/bin/ffmpeg postgresql=/usr/share/doc/postgresql

test: $(STAMP) lint debs
	$(PY) -m pytest -q -m "not slow" --durations=15

debs:
	@missing="$$(for d in $(DEBS); do test -e "$${d#*=}" || printf '%s ' "$${d%%=*}"; done)"; \
	test -z "$$missing" || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }

chromium: debs

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Stable-Baselines3 for the comparisons in benchmarks/. torch 2.13.0 first: its CPU wheel is on
# disk here, and without it pip would pull gigabytes of CUDA builds.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet stable-baselines3

bench: bench-deps
	$(PY) benchmarks/ppo_update_speed.py
	$(PY) benchmarks/learn_inverted_pendulum.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
