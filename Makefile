# hvdscale: every target installs first (launchers/install.sh is idempotent and returns at
# once when .venv is complete and up to date).
VENV    := .venv
PY      := $(VENV)/bin/python
HVDRUN  := $(VENV)/bin/horovodrun
NP      ?= 2
RECIPE  ?= pipelines/fashion_mnist_lamb.yaml
PYTEST_ARGS ?=
IMAGE   ?= localhost/hvdscale:cpu
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install install-gpu demo test test-fast test-gpu-simulate test-soak doctor lint clean image-cpu test-image ci-image

install:
	bash launchers/install.sh

install-gpu:
	bash launchers/install.sh --gpu

# The main job on the built-in data: the default recipe under horovodrun -np 2, torch then TF.
demo: install
	bash launchers/demo.sh $(NP) $(RECIPE)

# Not part of this run: the container image test (marker image) builds Horovod once more, the
# GPU check's simulation (marker gpu_simulate) runs its own stages, the soak test (marker soak)
# runs 20 minutes.
test: install
	$(PY) -m pytest -q -ra -m "not image and not gpu_simulate and not soak" $(PYTEST_ARGS)

# launchers/gpu_check.sh --simulate on a copy of the tree, offline (no GPU needed).
test-gpu-simulate: install
	$(PY) -m pytest -q -ra -m gpu_simulate $(PYTEST_ARGS)

# Everything but the multi-process jobs: a quick loop while editing.
test-fast: install
	$(PY) -m pytest -q -ra -m "not multiproc and not slow and not image and not gpu_simulate and not soak" $(PYTEST_ARGS)

# Faults every minute or two for 20 minutes under horovodrun -np 2 (tests/test_soak.py;
# HVDSCALE_SOAK_MINUTES=3 for a short check).
test-soak: install
	$(PY) -m pytest -q -ra -s -m soak $(PYTEST_ARGS)

# The CPU image with podman on a host without Docker or an image registry: a local Debian 12
# base image (debootstrap) stands in for python:3.11-slim-bookworm; host settings (runc,
# ulimits, host network) in launchers/container/podman-settings.sh; docs/cluster.md.
image-cpu:
	nice -n 10 bash launchers/container/build-cpu.sh $(IMAGE)

# Build (cached layers and the host's Horovod wheel are reused) and run doctor and a 2-worker
# training inside the image; installs podman/runc/debootstrap if missing; fails unless both
# tests ran and passed. CI (.ci/run) runs the same script after make test.
test-image: install
	bash launchers/container/ci-image.sh

ci-image: test-image

doctor: install
	$(VENV)/bin/hvdscale doctor

lint:
	shellcheck launchers/*.sh launchers/hosts/*.sh launchers/slurm/*.sbatch launchers/slurm/*.sh \
	    launchers/container/*.sh launchers/hvdscale-run .ci/run
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf runs .pytest_cache
