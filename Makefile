PYTHON ?= python3

.PHONY: install fake-nvml run run-adapter demo test lint bench bench-adapter clean

install:
	$(PYTHON) -m pip install -q -e '.[test,lint]'

# The fake libnvidia-ml.so.1 the tests and the simulated node load through the real pynvml bindings.
fake-nvml:
	$(PYTHON) -c 'from tests.sim.fakelib import build_fake_nvml; build_fake_nvml()'

# Runs the agent against the simulated node (no GPU, no cluster needed): see tests/sim/node.py.
run: install fake-nvml
	$(PYTHON) -m tests.sim.node

# The adapter over TLS (on a free port) in front of a real Prometheus scraping the simulated node; prints
# the kubectl-get-raw style requests to try (see README, "The HPA adapter").
run-adapter: install fake-nvml
	$(PYTHON) -m tests.sim.adapterdemo

# The GPU HPA story on one machine (under three minutes): prints kubectl-get-hpa lines every sync
# and draws hpa-demo.png.
demo: install fake-nvml
	$(PYTHON) -m tests.sim.hpademo --png hpa-demo.png

test: install fake-nvml
	$(PYTHON) -m pytest -q

lint: install
	ruff check exporter tests
	ruff format --check exporter tests
	mypy exporter
	lint-imports

clean:
	rm -f tests/fakenvml/libnvidia-ml.so.1 exporter/podresources/api_pb2*.py exporter/podresources/api_pb2*.pyi

# Side-by-side with nvitop-exporter on the same fake NVML scenarios; not part of make test (~15 min).
bench: install fake-nvml
	$(PYTHON) -m pip install -q 'nvitop-exporter>=1.4' 'matplotlib>=3.7'
	$(PYTHON) -m bench.compare --out bench/results

# The adapter's latency for the HPA's request over a 500-pod selector, against a real Prometheus.
bench-adapter: install fake-nvml
	$(PYTHON) -m bench.adapter --pods 500
