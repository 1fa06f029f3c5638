# Set-up, tests and the demo. Everything runs inside .venv in the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup test test-all lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Embedded demo set -> tiny SparK pretraining -> figure-4 reconstructions (a few minutes on 2 CPU cores).
# Re-running continues or reuses the finished run (--resume auto); delete $(DEMO_DIR) to start over.
demo: setup
	test -f $(DEMO_DIR)/data/demo.json || $(PY) -m pretrain.data make-demo $(DEMO_DIR)/data
	$(PY) -m pretrain --preset tiny --data $(DEMO_DIR)/data/train --out $(DEMO_DIR)/pretrain --resume auto
	$(PY) -m pretrain.visualize --ckpt $(DEMO_DIR)/pretrain/checkpoint-last.pth --images $(DEMO_DIR)/data/val \
		--out $(DEMO_DIR)/recon.png

clean:
	rm -rf $(VENV) runs .pytest_cache
