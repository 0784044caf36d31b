# Which Python make installs into and runs with: the active virtualenv if there is one, else the
# project's own .venv (made on first use from python3). PYTHON=... chooses another one, e.g. CI's
# `make test PYTHON=python3` for the system interpreter. `make install` says which it uses.
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= .venv/bin/python
endif
PROJECT_VENV := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python)

.PHONY: install fake-nvml run run-adapter demo test lint bench bench-adapter clean

.venv/bin/python:
	python3 -m venv .venv

install: $(PROJECT_VENV)
	@echo "make: installing gpu-pod-exporter (editable, with its test and lint tools) into $$($(PYTHON) -c 'import sys; print(sys.prefix)')"
	$(PYTHON) -m pip install -q -e '.[test,lint]'

# The fake libnvidia-ml.so.1 the tests and the simulated node load through the real pynvml bindings.
fake-nvml: $(PROJECT_VENV)
	$(PYTHON) -c 'from sim.fakelib import build_fake_nvml; build_fake_nvml()'

# Runs the agent against the simulated node (no GPU, no cluster needed): see sim/node.py.
run: install fake-nvml
	$(PYTHON) -m sim.node

# The adapter over TLS (on a free port) in front of a real Prometheus scraping the simulated node; prints
# the kubectl-get-raw style requests to try (see README, "The HPA adapter").
run-adapter: install fake-nvml
	$(PYTHON) -m sim.adapterdemo

# The GPU HPA story on one machine (under three minutes): prints kubectl-get-hpa lines every sync
# and draws hpa-demo.png.
demo: install fake-nvml
	$(PYTHON) -m sim.hpademo --png hpa-demo.png

test: install fake-nvml
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check exporter sim tests bench
	$(PYTHON) -m ruff format --check exporter sim tests bench
	$(PYTHON) -m mypy exporter sim tests bench
	$(PYTHON) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'

clean:
	rm -rf build sim/fakenvml/libnvidia-ml.so.1 exporter/sources/podresources/api_pb2*.py exporter/sources/podresources/api_pb2*.pyi \
		exporter/adapter/keda/externalscaler_pb2*.py exporter/adapter/keda/externalscaler_pb2*.pyi

# Side-by-side with nvitop-exporter on the same fake NVML scenarios; not part of make test (about an
# hour): one point in detail (bench.compare; `--quick`, 8 GPUs only, takes about 9 minutes), what the
# metric groups cost there (bench.groups: seed, seed,dcgm, seed,power and seed,power,cost side by side, about 9 minutes), then the cost
# curve from 1 GPU to 56 MIG devices and 512 processes (bench.curve, about 30 minutes), then the cost
# group's energy conservation while pods come and go (bench.conservation, 10 minutes).
bench: install fake-nvml
	$(PYTHON) -m pip install -q 'nvitop-exporter>=1.4' 'matplotlib>=3.7.3'
	$(PYTHON) -m bench.compare --out bench/results
	$(PYTHON) -m bench.groups --out bench/results
	$(PYTHON) -m bench.curve --out bench/results
	$(PYTHON) -m bench.conservation --out bench/results

# The adapter against a real Prometheus (~4 min): the HPA's request over a 500-pod selector at 10 clients,
# the same with 1000 stalled connections, and 10 000 / 50 000-pod clusters (time to ready, RSS). Then a
# 1000-node fleet's Prometheus built by promtool (bench.fleet: ~2.5 GB of temporary OpenMetrics text):
# the HPA's request for 1000 pods and the KEDA scaler's GetMetrics at 10 clients, into bench/results/fleet.*.
bench-adapter: install fake-nvml
	$(PYTHON) -m bench.adapter
	$(PYTHON) -m bench.fleet --out bench/results

# The image for amd64 and arm64 as one multi-arch manifest, pushed as IMAGE:VERSION (setup.cfg's
# version, which the Dockerfile's label and the manifests' image tags repeat). Needs docker buildx
# and a builder that can build both platforms: see docs/releasing.md.
IMAGE ?= gpu-pod-exporter
VERSION := $(shell sed -n 's/^version = //p' setup.cfg)
PLATFORMS ?= linux/amd64,linux/arm64

.PHONY: image-multiarch
image-multiarch:
	docker buildx build --platform $(PLATFORMS) --tag $(IMAGE):$(VERSION) --push .
