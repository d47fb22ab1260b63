PYTHON ?= python
# torch is installed from the pinned CPU wheel first so that dependency resolution never pulls
# the multi-GB CUDA build; on a GPU machine install your CUDA torch first, then `make install`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install lint test test-all run clean

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

lint:  ## ruff (rules in pyproject.toml [tool.ruff])
	$(PYTHON) -m ruff check qgplm tests experiments

test:  ## fast CPU tests, offline, a few minutes on 2 cores
	$(PYTHON) -m pytest -q -m "not slow"

test-all:  ## fast and slow tests
	$(PYTHON) -m pytest -q

run:  ## the embedded offline default: teacher + W2E2A8 QuantGPT student
	$(PYTHON) -m qgplm.run

clean:
	rm -rf logs .pytest_cache
