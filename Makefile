# The README's commands: `make reproduce` (set up, run the default study) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
DATA_ROOT := data
DEBIAN_FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup dataset browser reproduce reproduce-gpu gpu-bundle test bench lint clean

setup: $(VENV)/.installed dataset

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Debian's package where apt is usable as root; otherwise torchvision's download.
dataset: $(VENV)/.installed
	@if [ ! -e $(DEBIAN_FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(BIN)/normbench data fashion_mnist --root $(DATA_ROOT) --download

# Debian's Chromium for the report's browser test, where apt is usable as root (the test skips without it).
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium; fi

# A bare snakemake: the default config with the default profile (profiles/ -> workflow/profiles/).
reproduce: setup
	$(BIN)/snakemake
	@echo "report: $(CURDIR)/reports/report.html"

# Every claim at GPU scale on one CUDA GPU (config/gpu.yaml), with the GPU profile.
reproduce-gpu: setup
	$(BIN)/snakemake --workflow-profile workflow/profiles/gpu --configfile config/gpu.yaml
	@echo "report: $(CURDIR)/reports/report.html"

# For a GPU machine without network (.ci/gpu-check): wheels of what its image lacks, for CPython 3.12, and the
# dataset, into .gpu/.
GPU_WHEEL_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-bundle: setup
	mkdir -p .gpu/wheels .gpu/fashion-mnist
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: $(GPU_WHEEL_PLATFORM) -d .gpu/wheels -r .ci/gpu-wheels.txt
	$(BIN)/pip wheel --quiet --no-deps -w .gpu/wheels connection_pool==0.0.3
	@test -e $(DEBIAN_FASHION_MNIST) || { echo "gpu-bundle takes Fashion-MNIST from Debian's dataset-fashion-mnist \
	(apt-get install -y dataset-fashion-mnist, as root)"; exit 1; }
	cp $(DEBIAN_FASHION_MNIST:train-images-idx3-ubyte.gz=)*.gz .gpu/fashion-mnist/

test: setup browser
	$(BIN)/pytest

# normbench's own speed against its baselines; prints one ratio per line at the end.
bench: setup
	mkdir -p results/bench
	$(BIN)/pytest tests/benchmarks --benchmark-enable --benchmark-only -p no:cacheprovider \
		--benchmark-json=results/bench/speed.json -q

lint: setup
	$(BIN)/snakemake --lint

clean:
	rm -rf results reports .snakemake
