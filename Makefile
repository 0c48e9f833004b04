# Two commands do all the set-up: `make demo` (the embedded default, end to end) and
# `make test` (the test suite; .ci/run calls it). Both create/update .venv when needed.
#
# CPU-only machines get PyTorch's CPU build (TORCH_CPU, never a multi-GB CUDA download)
# and faiss-cpu; machines with an NVIDIA driver get the default CUDA build and faiss-gpu.
# Elsewhere than this workplace, the CPU wheel comes from PyTorch's index:
#   make demo PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kalm-installed
TORCH_CPU ?= torch==2.13.0+cpu
PIP_TORCH_ARGS ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SNAKEMAKE := $(OFFLINE) SNAKEMAKE_PROFILE=$(CURDIR)/profiles/local $(VENV)/bin/snakemake

.PHONY: demo real report test lint install dag clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q -e ".[gpu,test]"
else
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[cpu,test]"
endif
	# `source .venv/bin/activate` then lets a bare `snakemake results/mteb_zh.json` run locally;
	# an explicit `--profile profiles/slurm` replaces this default (Snakemake ignores the variable then).
	grep -q SNAKEMAKE_PROFILE $(VENV)/bin/activate || \
	  echo 'export SNAKEMAKE_PROFILE="$(CURDIR)/profiles/local" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false' >> $(VENV)/bin/activate
	touch $(STAMP)

demo: $(STAMP)
	$(SNAKEMAKE) results/mteb_zh.json results/mteb_en.json results/baseline/mteb_zh.json results/baseline/mteb_en.json

# The Snakemake report of the run in this folder (after `make demo`): plots, then report.html.
report: $(STAMP)
	$(SNAKEMAKE)
	$(SNAKEMAKE) --report report.html

# Proof on real data (../shared/data, see scripts/prepare_real_data.py): prepared into real/, run there.
REAL_TARGETS := results/mteb_zh.json results/mteb_en.json results/baseline/mteb_zh.json results/baseline/mteb_en.json
real: $(STAMP)
	$(PY) scripts/prepare_real_data.py --shared ../shared/data --out real
	$(SNAKEMAKE) $(REAL_TARGETS) -s $(CURDIR)/workflow/Snakefile --directory real --configfile real/config.yaml

# Two pytest workers, a test module each at a time (module fixtures such as the SLURM cluster start
# once); the tiny DAG run is built once for both (tests/conftest.py). --durations: what to trim first.
test: lint
	$(OFFLINE) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# ruff (lint + format), snakefmt, snakemake --lint beyond its documented exceptions (.ci/snakemake_lint.py),
# and the docs' links and names (.ci/check_links.py)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakefmt --check workflow/
	$(OFFLINE) $(PY) .ci/snakemake_lint.py
	$(PY) .ci/check_links.py  # README and docs/: links, anchors, repository paths and kalm.* names exist

# the README's picture, laid out by kalm's own SVG writer (graphviz's dot is not needed)
dag: $(STAMP)
	$(SNAKEMAKE) results/mteb_zh.json results/mteb_en.json --rulegraph > /tmp/kalm-rulegraph.dot
	$(OFFLINE) $(PY) -m kalm report rulegraph --dot /tmp/kalm-rulegraph.dot --out docs/rulegraph.svg

clean:
	rm -rf work models results logs benchmarks .snakemake real
