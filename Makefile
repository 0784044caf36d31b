PYTHON ?= python3

.PHONY: install fake-nvml run test lint bench clean

install:
	$(PYTHON) -m pip install -q -e '.[test,lint]'

# The fake libnvidia-ml.so.1 the tests and the simulated node load through the real pynvml bindings.
fake-nvml:
	$(PYTHON) -c 'from tests.sim.fakelib import build_fake_nvml; build_fake_nvml()'

# Runs the agent against the simulated node (no GPU, no cluster needed): see tests/sim/node.py.
run: install fake-nvml
	$(PYTHON) -m tests.sim.node

test: install fake-nvml
	$(PYTHON) -m pytest -q

lint: install
	ruff check exporter tests
	ruff format --check exporter tests
	mypy exporter
	lint-imports

clean:
	rm -f tests/fakenvml/libnvidia-ml.so.1 exporter/podresources/api_pb2*.py exporter/podresources/api_pb2*.pyi

# Figures for the agent on a simulated node (8 GPUs, 64 processes, 32 pods); not part of make test.
bench: install fake-nvml
	$(PYTHON) -m bench.agent --gpus 8 --procs 64 --pods 32 --json bench/agent-figures.json
