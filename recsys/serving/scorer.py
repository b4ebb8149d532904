"""An export folder as a Python object that scores raw rows (``recsys.serving.load``)."""

from __future__ import annotations

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
from recsys.data.preprocess.sources import Chunk, Source
from recsys.data.schema import schema_from_dict
from recsys.models.layers import fast_bfloat16
from recsys.serving.manifest import DamagedExport, read_manifest, verify_export
from recsys.serving.transform import (
    Preprocessing,
    Rows,
    ServingInputError,
    frame_rows,
    frame_transform,
    text_rows,
    transform,
)


def _check_lookups(vocab_dir: Path, features: list[str]) -> None:
    """Each feature's ``<feature>.lookup.npy`` has a readable ``[2, V]`` integer header (reads the headers
    only: a file of random bytes fails here, not in a parsing worker)."""
    for name in features:
        path = vocab_dir / f"{name}.lookup.npy"
        try:
            lookup = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DamagedExport(f"{path}: not a vocabulary lookup ({e})") from None
        if lookup.ndim != 2 or lookup.shape[0] != 2 or lookup.dtype.kind not in "iu":
            raise DamagedExport(f"{path}: a {lookup.dtype} array of shape {list(lookup.shape)}, expected int [2, V]")


class Scorer:
    """A loaded export: its manifest, preprocessing and TorchScript model.

    ``score(rows)`` runs training's parse and transforms on raw rows and returns click probabilities;
    ``last`` describes the last call (rows, bad rows by kind with examples, ids on the OOV row per
    feature); ``model.invalid_ids`` counts ids the model put on the OOV row because they were out of range.

    Args:
        export_dir: a folder written by ``recsys export``.
        batch_size: rows per model call.
        verify: compare every file's sha256 with the manifest (sizes are always compared); None: when the
            files total at most ``recsys.serving.manifest.VERIFY_BELOW_BYTES``.
        backend: ``torchscript`` (model.pt), or ``torch_export`` / ``aoti`` (``recsys.serving.exported``).

    Example::

        scorer = recsys.serving.load("runs/synthetic/export")
        p = scorer.score(Path("data/synthetic/test.tsv").read_text())  # raw lines -> [N] float32
        p = scorer.score(frame)                  # or a polars/pandas DataFrame with the schema's columns
        scorer.last["bad_rows"], scorer.last["oov"]  # rows the last call rejected, ids on the OOV row
    """

    def __init__(self, export_dir: str | Path, batch_size: int = 16384, verify: bool | None = None,
                 backend: str = "torchscript") -> None:
        folder = Path(export_dir)
        self.folder = folder
        self.manifest: dict[str, Any] = read_manifest(folder)
        self.verified = verify_export(folder, self.manifest, verify)
        pre = self.manifest["preprocessing"]
        schema = schema_from_dict(pre["schema"])
        self.preprocessing = Preprocessing(schema, str(folder / pre["vocab_dir"]) if pre["vocab_dir"] else None)
        if self.preprocessing.vocab_dir:
            _check_lookups(Path(self.preprocessing.vocab_dir), schema.sparse)
        self._unkeyed = replace(self.preprocessing, schema=replace(schema, id_column=""))  # score() aligns by position
        self.keys: list[str] = self.manifest["features"]["sparse"]
        model_path = folder / self.manifest["model"]["file"]
        try:
            self.model: Any = torch.jit.load(str(model_path))
        except RuntimeError as e:  # same size, other bytes, and not hashed (a large export without verify)
            raise DamagedExport(f"{model_path}: not a loadable TorchScript model ({str(e).splitlines()[0]}); "
                                "load with verify=True (`--verify`) to compare checksums") from None
        if backend != "torchscript":  # a program written by `recsys export --program` (recsys.serving.exported)
            from recsys.serving.exported import ProgramModel, load_program

            if "torch_export" not in self.manifest:
                raise ServingInputError(f"{folder}: no torch.export program; export it with --program")
            self.model = ProgramModel(load_program(folder, backend))
        if self.manifest["model"].get("mlp_precision") == "bfloat16" and backend == "torchscript" and not fast_bfloat16():
            warnings.warn(f"{model_path}: its MLP computes in bfloat16, which this CPU (no AVX512-BF16 or AMX) "
                          "emulates, slower than float32: export with --mlp-precision float32 for it", stacklevel=2)
        self.batch_size = batch_size
        self.last: dict[str, Any] = {}
        exported = self.manifest["versions"]["polars"]
        if exported != pl.__version__ and any(schema.kind(f) == "string" for f in schema.sparse):
            warnings.warn(f"string ids are hashed with polars; this is polars {pl.__version__}, the export used "
                          f"{exported}: if the hash changed, string ids map to other rows", stacklevel=2)

    def score(self, rows: Any, strict: bool = False, labelled: bool = True, context: Any = None,
              owner: np.ndarray | None = None) -> np.ndarray:
        """Click probabilities [N] float32 for raw rows, aligned with them.

        ``rows``: raw log lines in the export's format (one string or bytes with newlines, or a list of
        lines; with the label column unless ``labelled`` is False: lines one field short are refused
        otherwise, as a dropped column looks alike), or a polars/pandas DataFrame with the schema's columns
        (with or without the label, by name).
        ``context`` (DataFrame rows only): columns every row shares, such as one user's features beside
        its candidate items: a dict of column: value, or a DataFrame of one row per group of rows with
        ``owner`` [N] the context row of each row.
        A row that preprocessing would reject scores NaN and is counted in ``last`` (``strict`` raises
        instead, naming line and column). A missing column raises ServingInputError naming it.
        """
        if type(rows).__module__.startswith("pandas"):
            rows = pl.from_pandas(rows)
        preprocessing = self._unkeyed
        result = None
        if isinstance(rows, pl.DataFrame):
            if context is not None:
                context, owner = _context_frame(context, owner, rows)
            result = frame_transform(rows, preprocessing, context, owner) if rows.height else None
            if result is None and context is not None:
                rows = pl.concat([rows, context[owner]], how="horizontal")
            data, source, prep = (b"", Source("<frame>", None), preprocessing) if result else frame_rows(rows, preprocessing)
        else:
            if context is not None:
                raise ServingInputError("a context goes with DataFrame rows, not text lines")
            data, source, prep = text_rows(rows, preprocessing, labelled)
        if result is None:
            if not data:
                self.last = {"rows": 0, "bad_rows": 0, "errors": {}, "error_examples": [], "oov": {}}
                return np.zeros(0, dtype=np.float32)
            try:
                result = transform(data, source, Chunk(0, 0, data=data, first_line=1), prep, strict)
            except BadInput as e:
                raise ServingInputError(str(bad_input_error(e, [source]))) from None
        scores = self.score_rows(result)
        if len(scores) < result.records:  # bad rows score NaN in their place
            scores = result.in_place(scores).fill_null(np.nan).to_numpy()
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
            part = columns if len(columns) <= self.batch_size else columns.take(np.arange(lo, min(lo + self.batch_size, len(columns))))
            values, lengths = jagged_ids(self.keys, part.sparse, part.multi)
            dense = torch.from_numpy(part.dense)
            out[lo : lo + len(part)] = self.model.score_tensors(dense, values, lengths.view(len(self.keys), -1)).numpy()
        return out


def _context_frame(context: Any, owner: np.ndarray | None, rows: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """(the context as a DataFrame, [N] its row for each of ``rows``); checks they fit together."""
    if isinstance(context, dict):
        context = pl.DataFrame([context])
    if type(context).__module__.startswith("pandas"):
        context = pl.from_pandas(context)
    both = sorted(set(context.columns) & set(rows.columns))
    if both:
        raise ServingInputError(f"column {both[0]!r} is in both the context and the rows")
    if owner is None:
        if context.height != 1:
            raise ServingInputError(f"a context of {context.height} rows needs owner: the context row of each row")
        owner = np.zeros(rows.height, dtype=np.int64)
    owner = np.asarray(owner)
    if owner.shape != (rows.height,) or (len(owner) and not (0 <= owner.min() and owner.max() < context.height)):
        raise ServingInputError(f"owner must hold one context row (0..{context.height - 1}) per row: {rows.height} rows")
    return context, owner
