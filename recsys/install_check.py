"""Fails loudly when the install is incomplete (e.g. a bare `pip install -e .` without FBGEMM)."""

from __future__ import annotations

HINT = "install with `make install` (tools/install.sh), which picks fbgemm-gpu or fbgemm-gpu-cpu for this machine"


def check_install() -> None:
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
        import torch
        import torchrec  # noqa: F401
    except ImportError as e:
        raise ImportError(f"recsys needs torchrec and FBGEMM: {e}; {HINT}") from None
    for op in ("asynchronous_complete_cumsum", "permute_2D_sparse_data", "jagged_2d_to_dense"):
        if not hasattr(torch.ops.fbgemm, op):
            raise ImportError(f"FBGEMM op torch.ops.fbgemm.{op} is missing; {HINT}")


if __name__ == "__main__":
    check_install()
    print("recsys install OK")
