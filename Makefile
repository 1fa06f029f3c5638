# Set-up, tests and the demo. Everything runs inside .venv in the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup test test-all lint demo cluster-up cluster-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m downstream.det.install
	touch $(STAMP)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The embedded demo, end to end: the `tiny` sweep (slurm/sweeps/tiny.yaml: generated images and COCO-style set,
# tiny SparK pretraining, fine-tuning and Mask R-CNN from SparK weights and from scratch) through SLURM when
# sbatch works, else one job after another here; then the miniature table 3 and curves in $(DEMO_DIR)/tables
# and the figure-4 reconstructions. Re-running skips what finished; delete $(DEMO_DIR) to start over.
demo: setup
	$(PY) slurm/launch_all.py --stage pretrain,cls,det --sweep tiny --root $(DEMO_DIR) --wait
	$(PY) -m pretrain.visualize --weights $(DEMO_DIR)/tiny-pretrain/checkpoint-last.pth \
		--images $(DEMO_DIR)/tiny-images/images/val --out $(DEMO_DIR)/recon.png

# The one-node SLURM cluster of the tests and of `make demo` on SLURM (needs root and apt-get).
cluster-up:
	slurm/local_cluster.sh up

cluster-down:
	slurm/local_cluster.sh down

clean:
	rm -rf $(VENV) runs .pytest_cache
