#!/usr/bin/env bash
# The GPU checks in one go, on a CUDA box with this checkout (no GPU was lent to the sessions that wrote
# them, so they are prepared, not yet run):
#
#   tools/gpu_check.sh [--out gpu_check.json] [--steps 50] [--rows 1000000] [--batch 16384] [--dry-run]
#
# 1. installs recsys with the CUDA FBGEMM build (tools/install.sh with RECSYS_DEVICE=cuda) into $VENV;
# 2. checks that torch sees the GPU and FBGEMM's CUDA ops load;
# 3. runs the GPU tests (pytest -m gpu: fused kernels, UVM caching);
# 4. runs tools/gpu_bench.py: DLRM-DCNv2 (configs/mlperf_dlrmv2.yaml, dim 128) training samples/s at
#    Kaggle-sized (one-hot) and MLPerf-shaped (40M-capped, multi-hot) tables, with the `fused` and
#    `fused_uvm_caching` kernels; one JSON line per measurement, also written to --out.
# The aim on one H200: >= 1M samples/s for DLRM-DCNv2 at dim 128 (issue 19). --dry-run prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
out=gpu_check.json steps=50 rows=1000000 batch=16384 dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
for value in "$steps" "$rows" "$batch"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --steps, --rows and --batch take positive integers, not '$value'" >&2; exit 2; }
done

run() {
  echo "+ $*" >&2
  [ "$dry" = 1 ] || "$@"
}

run env RECSYS_DEVICE=cuda VENV="$VENV" tools/install.sh
run "$VENV/bin/python" -c "import torch, fbgemm_gpu; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.version.cuda)"
run "$VENV/bin/python" -m pytest -m gpu -q -p no:cacheprovider tests/distributed/test_gpu.py
run "$VENV/bin/python" tools/gpu_bench.py --regimes kaggle,mlperf --kernels fused,fused_uvm_caching \
  --steps "$steps" --rows "$rows" --batch "$batch" --device cuda --out "$out"
[ "$dry" = 1 ] || echo "gpu_check.sh: results in $out" >&2
