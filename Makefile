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

# The main job: train gpt-small on People's Daily with MindSpore (graph mode) for a few
# minutes on CPU, evaluate on held-out text, generate from Chinese prompts, plot the losses.
# DEMO_STEPS=2000 make demo trains for real (hours on CPU).
DEMO_STEPS ?= 80
DEMO_TRAIN = --set train.max_steps=$(DEMO_STEPS) --set train.batch_size=8 --set data.seq_len=128 \
	--set train.warmup_steps=10 --set train.learning_rate=1e-3 --set train.log_interval=5 \
	--set train.eval_interval=40 --set train.eval_batches=4 --set train.checkpoint_interval=40
DEMO_PROMPTS = --prompt "中国人民" --prompt "今天上午，" --prompt "经济发展"

demo: $(STAMP)
	$(BIN)/taichu info configs/gpt/gpt-small.yaml
	$(BIN)/taichu train configs/gpt/gpt-small.yaml --backend mindspore --out $(DEMO_DIR) $(DEMO_TRAIN)
	$(BIN)/taichu generate $(DEMO_DIR)/final --backend mindspore $(DEMO_PROMPTS) \
		--max-new-tokens 30 --temperature 0.8 --top-k 40 --repetition-penalty 1.2 --seed 0
	$(BIN)/taichu plot $(DEMO_DIR) --out $(DEMO_DIR)/loss.png
	$(BIN)/taichu parity $(DEMO_DIR)/final --graph

clean:
	rm -rf $(VENV) runs .pytest_cache
