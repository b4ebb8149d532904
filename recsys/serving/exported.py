"""The export beyond TorchScript: a torch.export program (``model.pt2``) and, optionally, its AOTInductor
build (``model_aoti.pt2``), both of the whole fp32 model with ``score_tensors``' inputs and cleaning.

What carries what (torch 2.13, torchrec 1.8, measured on the demo's model):

* torch.export (non-strict) carries the fp32 model both ways: TorchRec's ``KeyedJaggedTensor`` is a pytree
  node, so ``LogitModel(dense, KJT)`` exports (TorchRec warns that flattening a KJT through ``to_dict`` is
  slow), and so does the stacked-table module ONNX uses (:class:`~recsys.serving.modules.OnnxModel`, plain
  tensors in: no KJT, no FBGEMM op, no state). The file holds the latter: the same inputs as
  ``score_tensors`` for every caller. Run eagerly (``ExportedProgram.module()``) it is slower than
  TorchScript (its graph runs op by op in Python); compiled by AOTInductor into a shared library it is
  faster at every batch size (docs/serving_online.md has the figures).
* Quantized exports (int8/int4 tables) stay TorchScript only: their tables are FBGEMM's quantized
  operators (``QuantEmbeddingBagCollection``), which ONNX cannot carry and which this module does not export.
  ``model.pt`` stays in every export: it is what ``recsys predict`` and the ``forward(dense, KJT)`` entry use.

Programs have no ``invalid_ids`` counter (no state).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

PROGRAM_FILE = "model.pt2"
AOTI_FILE = "model_aoti.pt2"
BACKENDS = ("torchscript", "torch_export", "aoti")


def write_programs(module: torch.nn.Module, folder: Path, parity: tuple[torch.Tensor, ...], expected: np.ndarray,
                   aoti: bool) -> dict[str, Any]:  # fmt: skip
    """Exports ``module`` (dense [B, F_dense], values [L], lengths [F_sparse, B] -> [B]) with a dynamic batch
    into ``folder/model.pt2`` (and with ``aoti`` compiles ``model_aoti.pt2``); checks each against
    ``expected`` (TorchScript's scores of ``parity``). Returns the manifest's ``torch_export`` record."""
    dense, values, lengths = parity
    batch, ids = torch.export.Dim("batch"), torch.export.Dim("ids")
    example = (dense[:3], values[: int(lengths[:, :3].sum())], lengths[:, :3].contiguous())  # > 1 row: a dynamic batch
    started = time.perf_counter()
    program = torch.export.export(module.eval(), example, dynamic_shapes=({0: batch}, {0: ids}, {1: batch}), strict=False)
    torch.export.save(program, str(folder / PROGRAM_FILE))
    record: dict[str, Any] = {"file": PROGRAM_FILE, "export_seconds": round(time.perf_counter() - started, 2),
                              "inputs": ["dense", "values", "lengths"]}  # fmt: skip
    runners = {"torch_export": load_program(folder, "torch_export")}
    if aoti:
        started = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=str(folder / AOTI_FILE))
        record.update(aoti_file=AOTI_FILE, aoti_compile_seconds=round(time.perf_counter() - started, 1))
        runners["aoti"] = load_program(folder, "aoti")
    with torch.no_grad():
        for name, run in runners.items():
            record[f"{name}_max_abs_error_vs_torchscript"] = float(np.abs(run(dense, values, lengths).numpy() - expected).max())
    return record


def load_program(folder: str | Path, backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The export's program as ``fn(dense, values, lengths) -> [B] probabilities``: ``torch_export`` runs
    ``model.pt2`` eagerly, ``aoti`` loads the AOTInductor package."""
    folder = Path(folder)
    if backend == "aoti":
        return torch._inductor.aoti_load_package(str(folder / AOTI_FILE))
    if backend == "torch_export":
        return torch.export.load(str(folder / PROGRAM_FILE)).module()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class ProgramModel:
    """A program in the place of the TorchScript model: the ``score_tensors`` entry the Scorer calls."""

    def __init__(self, run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.run = run

    def score_tensors(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if dense.size(0) == 0:
            return torch.zeros(0)
        return self.run(dense.float(), values.long(), lengths.long())
