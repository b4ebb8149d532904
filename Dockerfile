# syntax=docker/dockerfile:1
# The image for cluster runs (torchx -s kubernetes / slurm): CUDA PyTorch, CUDA FBGEMM, TorchRec, recsys.
#
#   docker build -t recsys:latest .
#   torchx run -s kubernetes launch/components.py:train --image <registry>/recsys:latest ...
#
# Versions are the ones pyproject.toml and tools/install.sh pin (tests/launch/test_dockerfile.py checks it).
# torch 2.13.0's CUDA wheels are built for CUDA 13.0 and cuDNN 9, hence the base image.
ARG TORCH_VERSION=2.13.0
ARG BASE_IMAGE=pytorch/pytorch:${TORCH_VERSION}-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_VERSION
ARG FBGEMM_VERSION=1.8.0
ARG TORCHREC_VERSION=1.8.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CUDA build of FBGEMM, then TorchRec without its dependencies, as tools/install.sh does: torchrec's
# metadata would otherwise let pip pick FBGEMM and torch builds of its own. Naming torch pins the base's.
RUN pip install "torch==${TORCH_VERSION}" "fbgemm-gpu==${FBGEMM_VERSION}" \
 && pip install --no-deps "torchrec==${TORCHREC_VERSION}"

WORKDIR /workspace

# recsys's own dependencies in a layer of their own, so that editing the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install "torch==${TORCH_VERSION}" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY recsys ./recsys
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-deps . \
 && python - <<PY
from importlib.metadata import version
pins = {"torch": "${TORCH_VERSION}", "fbgemm-gpu": "${FBGEMM_VERSION}", "torchrec": "${TORCHREC_VERSION}"}
found = {name: version(name).split("+")[0] for name in pins}
assert found == pins, f"installed {found}, pinned {pins}"
PY

# Runs as an unprivileged user; run directories and data belong on mounted volumes.
RUN useradd --create-home --uid 1000 recsys && chown recsys:recsys /workspace
USER recsys
CMD ["python", "-m", "recsys.cli", "--help"]
