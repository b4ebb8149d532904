"""An export folder as a Python object that scores raw rows (``recsys.serving.load``)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.data.batching import jagged_ids
from recsys.data.preprocess.parse import BadInput
from recsys.data.preprocess.pipeline import PhaseStats, bad_input_error
from recsys.data.preprocess.sources import Chunk
from recsys.data.schema import schema_from_dict
from recsys.export import MANIFEST
from recsys.serving.transform import (
    Preprocessing,
    Rows,
    ServingInputError,
    frame_rows,
    text_rows,
    transform,
)


class Scorer:
    """A loaded export: its manifest, preprocessing and TorchScript model.

    ``score(rows)`` runs training's parse and transforms on raw rows and returns click probabilities;
    ``last`` describes the last call (rows, bad rows by kind with examples, ids on the OOV row per
    feature); ``model.invalid_ids`` counts ids the model put on the OOV row because they were out of range.

    Args:
        export_dir: a folder written by ``recsys export``.
        batch_size: rows per model call.
        backend: ``torchscript`` (model.pt), or ``torch_export`` / ``aoti`` (``recsys.serving.exported``).

    Example::

        scorer = recsys.serving.load("runs/synthetic/export")
        p = scorer.score(Path("data/synthetic/test.tsv").read_text())  # raw lines -> [N] float32
        p = scorer.score(frame)                  # or a polars/pandas DataFrame with the schema's columns
        scorer.last["bad_rows"], scorer.last["oov"]  # rows the last call rejected, ids on the OOV row
    """

    def __init__(self, export_dir: str | Path, batch_size: int = 16384, backend: str = "torchscript") -> None:
        folder = Path(export_dir)
        if not (folder / MANIFEST).is_file():
            raise ServingInputError(f"{folder}: no {MANIFEST}; not a `recsys export` folder")
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        pre = self.manifest["preprocessing"]
        schema = schema_from_dict(pre["schema"])
        self.preprocessing = Preprocessing(schema, str(folder / pre["vocab_dir"]) if pre["vocab_dir"] else None)
        self.keys: list[str] = self.manifest["features"]["sparse"]
        self.model: Any = torch.jit.load(str(folder / self.manifest["model"]["file"]))
        if backend != "torchscript":  # a program written by `recsys export --program` (recsys.serving.exported)
            from recsys.serving.exported import ProgramModel, load_program

            if "torch_export" not in self.manifest:
                raise ServingInputError(f"{folder}: no torch.export program; export it with --program")
            self.model = ProgramModel(load_program(folder, backend))
        self.batch_size = batch_size
        self.last: dict[str, Any] = {}
        exported = self.manifest["versions"]["polars"]
        if exported != pl.__version__ and any(schema.kind(f) == "string" for f in schema.sparse):
            warnings.warn(f"string ids are hashed with polars; this is polars {pl.__version__}, the export used "
                          f"{exported}: if the hash changed, string ids map to other rows", stacklevel=2)

    def score(self, rows: Any, strict: bool = False) -> np.ndarray:
        """Click probabilities [N] float32 for raw rows, aligned with them.

        ``rows``: raw log lines in the export's format (one string or bytes with newlines, or a list of
        lines; with or without the label column), or a polars/pandas DataFrame with the schema's columns.
        A row that preprocessing would reject scores NaN and is counted in ``last`` (``strict`` raises
        instead, naming line and column). A missing column raises ServingInputError naming it.
        """
        if type(rows).__module__.startswith("pandas"):
            rows = pl.from_pandas(rows)
        if isinstance(rows, pl.DataFrame):
            data, source, prep = frame_rows(rows, self.preprocessing)
        else:
            data, source, prep = text_rows(rows, self.preprocessing)
        prep = replace(prep, schema=replace(prep.schema, id_column=""))  # scores align with rows: no ids needed
        if not data:
            self.last = {"rows": 0, "bad_rows": 0, "errors": {}, "error_examples": [], "oov": {}}
            return np.zeros(0, dtype=np.float32)
        chunk = Chunk(0, 0, data=data, first_line=1)
        try:
            result = transform(data, source, chunk, prep, strict)
        except BadInput as e:
            raise ServingInputError(str(bad_input_error(e, [source]))) from None
        scores = np.full(result.result.lines, np.nan, dtype=np.float32)
        scores[result.line] = self.score_rows(result)
        stats = PhaseStats()
        stats.add(result.result, [source])
        self.last = {"rows": stats.lines, "bad_rows": stats.bad, "errors": stats.errors,
                     "error_examples": stats.examples, "oov": dict(zip(prep.schema.sparse, result.oov.tolist()))}
        return scores

    @torch.no_grad()
    def score_rows(self, rows: Rows) -> np.ndarray:
        """The model on transformed rows, ``batch_size`` at a time -> [N] float32."""
        columns = rows.columns
        out = np.empty(len(columns), dtype=np.float32)
        for lo in range(0, len(columns), self.batch_size):
            part = columns.take(np.arange(lo, min(lo + self.batch_size, len(columns))))
            values, lengths = jagged_ids(self.keys, part.sparse, part.multi)
            dense = torch.from_numpy(part.dense)
            out[lo : lo + len(part)] = self.model.score_tensors(dense, values, lengths.view(len(self.keys), -1)).numpy()
        return out
