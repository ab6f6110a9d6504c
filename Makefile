# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test chromium lint format bench-deps bench clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e client -e '.[test]'
	touch $(STAMP)

# Until the service lands: PPO on MuJoCo InvertedPendulum with a live progress table.
demo: $(STAMP)
	$(VENV)/bin/openpi-rl train --env InvertedPendulum-v5 --num_train_steps 60 --target_return 950

# The pendant page's browser test drives Debian's chromium (no browser download).
test: $(STAMP) lint chromium
	$(PY) -m pytest -q -m "not slow"

chromium:
	@test -x /usr/bin/chromium || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

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
