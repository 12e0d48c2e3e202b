# The README's commands: `make reproduce` (set up, run the default study) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
DATA_ROOT := data
DEBIAN_FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup dataset browser reproduce test bench lint clean

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
