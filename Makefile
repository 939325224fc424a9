# The README's commands. `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup data demo test test-fast bench bench-gpu serve-demo bench-serve bench-soak clean

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

# Export the newest `make demo` run (all formats + int8) and serve it with the demo page on http://127.0.0.1:8000/
serve-demo: setup
	@run=$$(ls -dt runs/classification/demo-* 2>/dev/null | head -1); \
	  test -n "$$run" || { echo "no demo run yet: run 'make demo' first"; exit 1; }; \
	  $(VENV)/bin/modelworks export $$run --quantize int8 --force && \
	  $(VENV)/bin/modelworks serve $$run/package --port 8000

# The serving benchmark on the default recipe's model (trained and exported once, then reused).
BENCH_RUN := runs/classification/serve-bench
bench-serve: setup data
	@test -f $(BENCH_RUN)/checkpoints/best.pt || \
	  $(VENV)/bin/modelworks train classification --recipe fashion-mnist --name serve-bench
	@test -f $(BENCH_RUN)/package/manifest.json || $(VENV)/bin/modelworks export $(BENCH_RUN) --quantize int8
	$(PY) bench/serve.py --package $(BENCH_RUN)/package

# Ten minutes of good, bad and hostile traffic (and admin actions) against the same model; bench/results/soak.json.
bench-soak: setup data
	@test -f $(BENCH_RUN)/checkpoints/best.pt || \
	  $(VENV)/bin/modelworks train classification --recipe fashion-mnist --name serve-bench
	@test -f $(BENCH_RUN)/package/manifest.json || $(VENV)/bin/modelworks export $(BENCH_RUN) --quantize int8
	$(PY) bench/soak.py --package $(BENCH_RUN)/package

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf runs bench/results
