# Two commands do everything on a fresh machine:
#   make demo   set up .venv, build the shipped MNIST model for Lava, validate it, report
#   make test   set up .venv, run the test suite
PYTHON ?= python3.10
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= build/mnist-lava

.PHONY: demo test lint lock bench peers clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toolchain build models/mnist_cnn.onnx --target lava -T 32 \
		--data models/data/mnist --validate 20 --report -o $(DEMO_OUT)
	$(VENV)/bin/toolchain inspect $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# Regenerate the pinned set after changing dependencies (Python 3.10, Lava included).
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed '1i # Pinned set for Python 3.10 (the project interpreter, Lava included). Regenerate with `make lock`.' > requirements.lock

# The peers the benches compare against (bench/stock_models.py, bench/throughput.py), never a
# toolchain dependency: installed into .peers/ beside the venv, used with PYTHONPATH=.peers.
# torchvision is pinned to the venv's torch (onnx2torch imports it); --no-deps keeps that torch.
PEERS := .peers
PEER_PACKAGES := spikingjelly==0.0.0.0.14 onnx2torch==1.5.15 torchvision==0.29.1 tqdm==4.67.1 \
	requests==2.32.3 urllib3==2.2.3 idna==3.10 charset-normalizer==3.4.0 certifi==2024.8.30
$(PEERS)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(PEERS) $(PEER_PACKAGES)
	PYTHONPATH=$(PEERS) $(PY) -c "import onnx2torch, spikingjelly.activation_based.ann2snn"
	@touch $@

peers: $(PEERS)/.installed

clean:
	rm -rf $(VENV) $(PEERS) build
