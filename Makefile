# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use and reinstall when setup.py changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Tokenizer on People's Daily -> gpt-small initialised in MindSpore -> saved as a model
# directory -> reloaded in MindSpore (graph mode) and PyTorch, logits compared on held-out text.
demo: $(STAMP)
	$(BIN)/taichu info configs/gpt/taichu-text-3b2.yaml
	test -f $(DEMO_DIR)/tokenizer.model || \
		$(BIN)/taichu tokenizer train configs/gpt/gpt-small.yaml --out $(DEMO_DIR)/tokenizer.model
	$(BIN)/taichu init configs/gpt/gpt-small.yaml --backend mindspore \
		--tokenizer $(DEMO_DIR)/tokenizer.model --out $(DEMO_DIR)/gpt-small-init
	$(BIN)/taichu info $(DEMO_DIR)/gpt-small-init
	$(BIN)/taichu parity $(DEMO_DIR)/gpt-small-init --graph

clean:
	rm -rf $(VENV) runs .pytest_cache
