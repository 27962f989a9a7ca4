# syntax=docker/dockerfile:1.7
# hvdscale in a container, installed by launchers/install.sh (the project's one install path).
#
#   docker build -t hvdscale:gpu .                          # CUDA 13.0, NCCL, OpenMPI
#   docker build --build-arg CPU_ONLY=1 -t hvdscale:cpu .   # Debian 12 + Python 3.11, Gloo/MPI
#   docker run --rm --gpus all --ipc=host hvdscale:gpu doctor
#
# CUDA 13.0 because the pinned torch 2.13 wheel is built for it (cuda-toolkit 13.0, NCCL
# 2.x for cu13) and DALI is pinned as nvidia-dali-cuda130; Horovod is compiled against the
# base image's CUDA and NCCL, linked to NCCL as a shared library so one libnccl is loaded.
# Hosts need a driver that supports CUDA 13 (R580 or newer). docs/cluster.md has the
# multi-container horovodrun example.

ARG CPU_ONLY=0
ARG CUDA_VERSION=13.0.2
ARG CPU_IMAGE=python:3.11-slim-bookworm

# ---- base images: suffix 0 = GPU, 1 = CPU-only; CPU_ONLY picks one, BuildKit skips the other
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04 AS build-base-0
# Ubuntu's python3 (3.12) needs its headers and venv module; the python image has both.
ENV HVDSCALE_PY_APT="python3 python3-dev python3-venv" \
    HVDSCALE_INSTALL_FLAGS="--gpu" \
    HOROVOD_NCCL_LINK=SHARED

FROM ${CPU_IMAGE} AS build-base-1
ENV HVDSCALE_PY_APT="" \
    HVDSCALE_INSTALL_FLAGS=""

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04 AS runtime-base-0
ENV HVDSCALE_PY_APT="python3"

FROM ${CPU_IMAGE} AS runtime-base-1
ENV HVDSCALE_PY_APT=""

# ---- builder: compilers, OpenMPI headers, then install.sh builds .venv (Horovod from source)
# hadolint ignore=DL3006
FROM build-base-${CPU_ONLY} AS builder
# CUDA 13 builds nothing below compute capability 7.5 (Volta and older are gone)
ARG CUDA_ARCH="80;90"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# install.sh would apt-get these itself; one cached layer keeps rebuilds of the venv fast.
# Distro packages follow the base image (no version pins); HVDSCALE_PY_APT is a word list.
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake libopenmpi-dev openmpi-bin \
        dataset-fashion-mnist shellcheck iproute2 openssh-server openssh-client procps \
        ca-certificates ${HVDSCALE_PY_APT} \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/hvdscale
# Only what the install reads, so editing the code does not re-run it.
COPY launchers/install.sh launchers/build_horovod.sh launchers/patch_horovod.sh \
     launchers/horovod-wait.patch launchers/constraints.txt launchers/
COPY setup.cfg pyproject.toml README.md ./
COPY hvdscale/__init__.py hvdscale/
# The Horovod wheel lands in HVDSCALE_CACHE, a BuildKit cache mount that outlives this build:
# the next build (new code, new base image digest) reuses the wheel instead of compiling
# Horovod again; install.sh keys it by Horovod/torch/TF/Python/MPI versions and CUDA arch.
# A host's wheel cache mounted read-only at /opt/host-wheels (launchers/container/build-cpu.sh
# does, on a host of the same Debian release) seeds it: a wheel whose key matches is used,
# none is compiled. HVDSCALE_INSTALL_FLAGS is empty or --gpu, split on purpose.
# hadolint ignore=SC2086
RUN --mount=type=cache,id=hvdscale-wheels,target=/root/.cache/hvdscale \
    --mount=type=cache,id=hvdscale-pip,target=/root/.cache/pip \
    for seed in /opt/host-wheels/horovod-*-????????????????; do \
        if [ -d "$seed" ] && [ ! -d "/root/.cache/hvdscale/${seed##*/}" ]; then \
            cp -r "$seed" /root/.cache/hvdscale/ && echo "seeded from the host: ${seed##*/}"; fi; \
    done \
 && HVDSCALE_CACHE=/root/.cache/hvdscale HVDSCALE_TEST_PACKAGES=0 \
    bash launchers/install.sh ${HVDSCALE_INSTALL_FLAGS} --cuda-arch "${CUDA_ARCH}" \
 && mkdir -p /opt/wheel-cache \
 && cp -r /root/.cache/hvdscale/. /opt/wheel-cache/

# ---- the built Horovod wheel alone, for installs outside containers:
#   docker build --target wheels --output type=local,dest=wheels .
#   HVDSCALE_CACHE=$PWD/wheels launchers/install.sh --gpu
FROM scratch AS wheels
COPY --from=builder /opt/wheel-cache /

# ---- runtime: the same distro and Python without the compilers, as a non-root user
# hadolint ignore=DL3006
FROM runtime-base-${CPU_ONLY} AS runtime
ARG USER_UID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# OpenMPI from the distro, the same one Horovod and mpi4py were built against; sshd and ssh
# for horovodrun/mpirun across containers. Unpinned and split as in the builder.
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
 && apt-get install -y --no-install-recommends openmpi-bin dataset-fashion-mnist \
        openssh-server openssh-client iproute2 procps ${HVDSCALE_PY_APT} \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd && ssh-keygen -A \
 && useradd --create-home --uid "${USER_UID}" --shell /bin/bash hvd
WORKDIR /opt/hvdscale
COPY --from=builder /opt/hvdscale/.venv /opt/hvdscale/.venv
COPY . /opt/hvdscale
RUN install -d -o hvd -g hvd /opt/hvdscale/runs \
 && /opt/hvdscale/.venv/bin/python -c "import hvdscale, horovod.torch, horovod.tensorflow"
ENV PATH=/opt/hvdscale/.venv/bin:${PATH} \
    TF_CPP_MIN_LOG_LEVEL=2
USER ${USER_UID}
ENTRYPOINT ["hvdscale"]
CMD ["doctor"]
