#!/usr/bin/env bash
# Creates the virtual environment ($VENV, default .venv) and installs recsys with the FBGEMM build that
# fits this machine. Idempotent: `make` calls it whenever pyproject.toml or this file changes.
#
# Why not plain `pip install -e .`: torchrec's metadata requires `fbgemm-gpu`, the CUDA build, which on a
# CPU box pulls gigabytes of CUDA wheels and then fails to load. So torchrec is installed with --no-deps,
# after the right fbgemm: `fbgemm-gpu` where an NVIDIA GPU is visible, `fbgemm-gpu-cpu` elsewhere
# (override with RECSYS_DEVICE=cpu|cuda). recsys checks at import time that the FBGEMM ops are present.
# Extras: RECSYS_EXTRAS (default `test,bench`: tests/tools/ runs every tool) names the pyproject.toml extras to install, e.g.
# `RECSYS_EXTRAS=test,k8s,bench bash tools/install.sh` (k8s: `torchx run -s kubernetes`; bench: tools/).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCHREC_VERSION=1.8.0
FBGEMM_VERSION=1.8.0

device=${RECSYS_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
case "$device" in
  cuda) fbgemm="fbgemm-gpu==${FBGEMM_VERSION}" ;;
  cpu) fbgemm="fbgemm-gpu-cpu==${FBGEMM_VERSION}" ;;
  *) echo "install.sh: RECSYS_DEVICE must be cpu or cuda, not '$device'" >&2; exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
# pip's conflict report after each install would name torchrec's requirement on `fbgemm-gpu` (the CUDA
# distribution), which the build chosen above satisfies under another distribution name (fbgemm-gpu-cpu
# provides the same fbgemm_gpu package): an ERROR line nobody must act on. So the installs skip that report
# and `pip check` runs once at the end, where that one known line is dropped and any other broken
# requirement fails the install.
install() { pip install -q --no-warn-conflicts "$@"; }
echo "install.sh: installing for $device into $VENV"
# torch first and alone, pinned, so nothing later can swap it for another build.
install "torch==2.13.0"
install "$fbgemm"
install --no-deps "torchrec==${TORCHREC_VERSION}"
extras=${RECSYS_EXTRAS:-test,bench}
[[ "$extras" =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]] || { echo "install.sh: RECSYS_EXTRAS must be a comma-separated list of extras, not '$extras'" >&2; exit 2; }
install -e ".[$extras]"
known="^torchrec [^ ]+ requires fbgemm-gpu, which is not installed\.$"
if ! report=$(pip check); then  # problems on stdout; pip's own warnings stay on stderr
  broken=$(grep -Ev "$known" <<<"$report" || true)
  if [ -n "$broken" ]; then
    printf 'install.sh: broken requirements in %s:\n%s\n' "$VENV" "$broken" >&2
    exit 1
  fi
fi
"$VENV/bin/python" -c "import recsys.install_check as c; c.check_install()"
touch "$VENV/.recsys-installed"
