# The README's commands. `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup data demo test test-fast bench bench-gpu clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned to the pair this project is tested with (the CUDA build also runs on CPU).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# Real Fashion-MNIST from Debian's package (MIT licence); without apt, `--set data.download=true` fetches it.
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  (command -v apt-get >/dev/null && (apt-get install -y -qq dataset-fashion-mnist || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist))) || \
	  echo "Fashion-MNIST not installed system-wide; training will ask for it (see README: Data)"

demo: setup data
	$(VENV)/bin/modelworks train classification --recipe fashion-mnist --name demo-$$(date +%Y%m%d-%H%M%S)

test: setup data
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not ddp"

bench: setup data
	$(PY) bench/classification.py

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf runs bench/results
