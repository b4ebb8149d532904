"""Export a trained model for serving: one self-contained folder, written atomically.

The chosen checkpoint (by default the best one early stopping marked, else the latest; possibly written by
many ranks, with tables split across them) is loaded into the unsharded model (``model.name``, built through ``recsys.models.registry``) with torch.distributed.checkpoint, which reassembles every table.
The folder holds everything needed to score raw logs without the training data or config:

    EXPORT/
      manifest.json   versions, checkpoint and step, metrics at export, features in model order, the
                      preprocessing (schema, dense transform, sparse mode, hash buckets, missing/OOV rows),
                      negative_sampling_rate (calibration), quantization and ONNX reports, every file's size
                      and sha256 (recsys.serving.manifest: checked by every load)
      model.pt        TorchScript (recsys.serving.modules.ServedModel): forward(dense, KJT) and
                      score_tensors(dense, values, lengths) -> [B] probabilities; its MLPs compute in
                      float32, or with ``--mlp-precision bfloat16`` in bfloat16 (the manifest compares
                      its test AUC with float32's)
      vocab/          vocab mode: <feature>.lookup.npy ([2, V] sorted token keys, rows) and
                      <feature>.parquet (token, count in row order), copied from preprocessing
      model.onnx      with --onnx: the whole model (tables stacked) or, when the tables exceed the ONNX
                      limit, the dense part over pooled embeddings
      config.yaml     the run's resolved config

``torchrec.fx.symbolic_trace`` traces the model (KeyedJaggedTensor stays a leaf) and TorchScript compiles
it. ``quantize`` swaps the tables for TorchRec's ``QuantEmbeddingBagCollection`` (FBGEMM row-wise int8 or
int4 with an fp16 scale and bias per row) via ``torchrec.inference.modules.quantize_inference_model``, after
cutting them to the columns the model reads, and the model's dense parts for int8 stand-ins from its
export hook (``recsys.serving.modules.compact_for_quantization``). A model without the hook for
``--quantize`` or ``--onnx`` is refused in one line (``UnsupportedByModel``).
Full tables must fit in the exporting host's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
import yaml
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.fx import symbolic_trace
from torchrec.inference.modules import quantize_inference_model
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import recsys
from recsys.checkpoint import check_shapes, read_tensors, resolve_checkpoint
from recsys.config import Config, UserError
from recsys.data.preprocess import FIRST_VOCAB_ID, MISSING_ID, OOV_ID
from recsys.data.schema import schema_from_dict
from recsys.data.shards import ShardedSplit, read_metadata
from recsys.integrity import naming_path
from recsys.models.layers import products_in_bfloat16
from recsys.models.registry import CTRTrain, ModelSpec, UnsupportedByModel, build_model, model_spec
from recsys.resolve import resolve_config
from recsys.serving.manifest import FORMAT, MANIFEST, seal
from recsys.serving.modules import LogitModel, OnnxDenseModel, OnnxModel, ServedModel, compact_for_quantization

MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"
MLP_PRECISIONS = ("float32", "bfloat16")
# FBGEMM's row-wise formats with CPU kernels in fbgemm-gpu-cpu 1.8 (both checked: tests/serving/test_quantize_onnx.py).
QUANTIZE = {"int8": torch.int8, "int4": torch.quint4x2}
# Columns a quantized row's width must be a multiple of: its packed bytes must be even ("ncols needs to be
# multiple of 2 Bytes" before the fp16 scale and bias).
QUANT_COLUMN_MULTIPLE = {"int8": 2, "int4": 4}
# Rows are packed without alignment padding: the CPU kernels read unaligned rows, and int4 rows of a
# 12-wide table take 10 bytes instead of TorchRec's default 16 (CUDA serving re-shards with 16-byte rows).
QUANT_ROW_ALIGNMENT = 1
# ONNX stores a model in one protobuf message (2 GiB at most); larger tables are left out (dense part only).
ONNX_TABLE_LIMIT_BYTES = 1 << 30
ONNX_TOLERANCE = 1e-5
PARITY_ROWS = 2048


class ExportError(UserError):
    """An export that cannot be made or fails its own checks."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the tracers' and exporters' advice (warnings, and logs from torch and onnx_ir)."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def load_unsharded(config: Config, checkpoint: str) -> torch.nn.Module:
    """The model on CPU with the weights of a (possibly sharded) DCP checkpoint; ``config`` is resolved.

    The MLP computes in float32 whatever ``model.mlp_precision`` trained it (the weights are float32 either
    way): the serving machine is not the training host (bfloat16 products are fast only with AVX512-BF16 or
    AMX), and ONNX Runtime has no bfloat16 Gemm on CPU. ``--mlp-precision bfloat16`` asks for it explicitly
    (:func:`export_model`)."""
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, mlp_precision="float32"))
    wrapper = CTRTrain(build_model(config, device="cpu"))
    check_shapes(checkpoint, {name: value.shape for name, value in wrapper.state_dict().items()})
    wrapper.load_state_dict(read_tensors(checkpoint))
    return wrapper.model.eval().requires_grad_(False)


def serving_preprocessing(config: Config) -> tuple[dict, Path | None]:
    """(the schema training's data went through, as a dict; the vocabulary folder in vocab mode), from the
    ``metadata.json`` of the shards ``data.train`` names (a resolved config: ``recsys.resolve``)."""
    root = Path(config.data.train).parent
    schema = schema_from_dict(read_metadata(root / "metadata.json")["schema"])
    return schema.to_dict(), (root / "vocab" if schema.sparse_mode == "vocab" else None)


def _id_rules(schema: dict, features: list[str], table_sizes: list[int]) -> dict:
    rows = dict(zip(features, table_sizes))
    if schema["sparse_mode"] == "vocab":
        return {"mode": "vocab", "missing_row": MISSING_ID, "oov_row": OOV_ID, "first_row": FIRST_VOCAB_ID,
                "table_rows": rows, "oov_rows": [OOV_ID] * len(features),
                "rule": "empty field -> row 0; a token seen fewer than min_count times in train, or never -> "
                        "row 1 (OOV); else its vocabulary row"}  # fmt: skip
    return {"mode": "hash", "table_rows": rows, "oov_rows": [-1] * len(features),
            "rule": "empty field -> row 0; hex/int id -> id mod table_rows; string -> polars hash (seed 0) mod "
                    "table_rows; there is no OOV row: an out-of-range id given to the model is taken mod table_rows"}  # fmt: skip


def _run_metrics(run_dir: str) -> dict[str, dict]:
    """The last logged val and test metrics of the run (``metrics.jsonl``)."""
    path = Path(run_dir) / "metrics.jsonl"
    last: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") in ("val", "test"):
                last[record.pop("stage")] = record
    return last


def _versions() -> dict[str, str]:
    import fbgemm_gpu
    import torchrec

    return {"recsys": recsys.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchrec": torchrec.__version__, "fbgemm_gpu": fbgemm_gpu.__version__, "polars": pl.__version__,
            "numpy": np.__version__}  # fmt: skip


def script_model(
    model: torch.nn.Module, serving: dict, quantize: str | None = None, spec: ModelSpec | None = None
) -> torch.jit.ScriptModule:
    """The TorchScript serving model; ``quantize`` ("int8"/"int4") swaps in TorchRec's quantized tables and
    the dense parts of the model's int8 hook (``spec``: the model's registry entry).

    ``serving``: the manifest's ``features``, ``preprocessing.ids`` and ``negative_sampling_rate``.
    """
    logits = LogitModel(model)
    if quantize:
        assert spec is not None and spec.int8_parts is not None, "check_supported refuses such exports"
        logits = LogitModel(compact_for_quantization(model, spec.extra_columns, spec.int8_parts, QUANT_COLUMN_MULTIPLE[quantize]))
        quant_prep_customize_row_alignment(logits, [EmbeddingBagCollection], QUANT_ROW_ALIGNMENT)
        logits = quantize_inference_model(logits, quantization_dtype=QUANTIZE[quantize])
    features, ids = serving["features"], serving["preprocessing"]["ids"]
    with _quiet():
        served = ServedModel(
            torch.jit.script(symbolic_trace(logits)), features["sparse"], len(features["dense"]),
            [ids["table_rows"][f] for f in features["sparse"]], ids["oov_rows"], serving["negative_sampling_rate"],
        )  # fmt: skip
        return torch.jit.script(served)


def model_batches(config: Config, rows: int | None = None) -> Iterator[Batch]:
    """Batches of the test split (else val), up to ``rows`` rows."""
    data = config.data
    seen = 0
    for batch in ShardedSplit(data.test or data.val).batches(data.eval_batch_size, prefetch=0):
        if rows is not None and seen >= rows:
            return
        yield batch
        seen += len(batch.labels)


@torch.no_grad()
def split_aucs(models: list[torch.jit.ScriptModule], config: Config) -> list[float]:
    """AUC of each served model on the test split, read once for all of them."""
    aucs = [BinaryAUROC() for _ in models]
    for batch in model_batches(config):
        for model, auc in zip(models, aucs):
            auc.update(model(batch.dense_features, batch.sparse_features), batch.labels)
    return [float(auc.compute()) for auc in aucs]


def _parity_inputs(config: Config, bad_ids: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense [B, F_dense], values [L], lengths [F_sparse, B]) from the first test rows, with a NaN and an
    inf dense value (where F_dense > 0) and, if ``bad_ids``, a negative and an out-of-range id (models must clean them alike)."""
    batch = next(model_batches(config, PARITY_ROWS))
    rows = min(PARITY_ROWS, len(batch.labels))
    kjt = batch.sparse_features
    lengths = kjt.lengths().view(len(kjt.keys()), -1)[:, :rows].long().contiguous()
    values = torch.cat([v[: int(n)] for v, n in zip(kjt.values().split(kjt.length_per_key()), lengths.sum(1))])
    dense = batch.dense_features[:rows].clone()
    if dense.size(1):  # schemas without dense features (Avazu) have none to spoil
        dense[0, 0], dense[-1, -1] = float("nan"), float("inf")
    if bad_ids:
        values[0], values[-1] = -3, 1 << 40
    return dense, values.long(), lengths


def export_onnx(model: torch.nn.Module, serving: dict, path: Path, table_limit_bytes: int) -> dict:
    """Writes ``model.onnx``: the whole model when its tables fit ``table_limit_bytes``, else the dense part.

    Returns the manifest's ``onnx`` record (file, what it carries, its inputs).
    """
    ebc = model.sparse_arch.embedding_bag_collection
    table_bytes = sum(t.weight.numel() * t.weight.element_size() for t in ebc.embedding_bags.values())
    features, rate = serving["features"], serving["negative_sampling_rate"]
    batch = 3  # > 1, or the exporter specializes the batch dimension
    dense = torch.rand(batch, len(features["dense"]))
    if table_bytes <= table_limit_bytes:
        module: torch.nn.Module = _stacked(model, serving)
        lengths = torch.ones(len(features["sparse"]), batch, dtype=torch.long)
        args: tuple = (dense, torch.zeros(int(lengths.sum()), dtype=torch.long), lengths)
        names = ["dense", "values", "lengths"]
        shapes: tuple = ({0: "batch"}, {0: "ids"}, {1: "batch"})
        carries = "whole model: tables stacked into one [rows, width] initializer"
    else:
        module = OnnxDenseModel(model, rate)
        width = next(iter(ebc.embedding_bags.values())).weight.size(1)
        args = (dense, torch.rand(batch, len(features["sparse"]), width))
        names, shapes = ["dense", "pooled"], ({0: "batch"}, {0: "batch"})
        carries = f"dense part only: the tables ({table_bytes / 2**30:.2f} GiB) exceed {table_limit_bytes / 2**30:.2f} GiB"
    with _quiet():
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=["probability"],
                          dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False)  # fmt: skip
    return {"file": path.name, "carries": carries, "inputs": names, "table_bytes": table_bytes}


def check_onnx(path: Path, scripted: torch.jit.ScriptModule, model: torch.nn.Module, config: Config, record: dict) -> float:
    """Max |ONNX (onnxruntime) - TorchScript (fp32)| over test rows with bad values mixed in; ExportError
    above ``ONNX_TOLERANCE``."""
    import onnxruntime

    whole = record["inputs"][1] == "values"
    dense, values, lengths = _parity_inputs(config, bad_ids=whole)
    with torch.no_grad():
        expected = scripted.score_tensors(dense, values, lengths).numpy()
        if whole:
            feed = {"dense": dense.numpy(), "values": values.numpy(), "lengths": lengths.numpy()}
        else:  # the dense part takes the rows the trained tables pool
            kjt = KeyedJaggedTensor(keys=config.data.sparse_features, values=values, lengths=lengths.reshape(-1).int())
            feed = {"dense": dense.numpy(), "pooled": model.sparse_arch(kjt).numpy()}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    error = float(np.abs(session.run(None, feed)[0] - expected).max())
    if not error <= ONNX_TOLERANCE:
        raise ExportError(f"ONNX and TorchScript disagree by {error:.3g} (> {ONNX_TOLERANCE}) on test rows")
    return error


def save_script(module: torch.jit.ScriptModule, path: Path) -> None:
    """``module.save(path)`` through a Python file: TorchScript's own file writer aborts the process (C++
    terminate, exit 134) when the disk fills; a Python file raises OSError naming the path instead."""
    with naming_path(path), open(path, "wb") as fh:
        torch.jit.save(module, fh)


def check_supported(config: Config, quantize: str | None, onnx: bool, program: str | None = None) -> None:
    """UnsupportedByModel (one line, exit 2) when the configured model lacks the export hook asked for."""
    spec, name = model_spec(config), config.model.name
    if quantize and spec.int8_parts is None:
        raise UnsupportedByModel(f"--quantize {quantize} is not supported for model {name}")
    if onnx and not spec.onnx:
        raise UnsupportedByModel(f"--onnx is not supported for model {name}")
    if program and not spec.onnx:  # the program carries the module ONNX exports (recsys.serving.exported)
        raise UnsupportedByModel(f"--program {program} is not supported for model {name}")
    if program and quantize:
        raise ExportError("--program carries fp32 tables only: quantized tables are FBGEMM operators (TorchScript)")


def _check_destination(out: Path) -> None:
    """An export replaces an earlier export or an empty folder, never another folder."""
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists() and not (out / MODEL_FILE).exists():
        raise ExportError(f"{out} exists and is not an export folder; refusing to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished folder into place, replacing an earlier export."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def export_model(
    config: Config,
    out_dir: str,
    checkpoint: str | None = None,
    quantize: str | None = None,
    onnx: bool = False,
    program: str | None = None,
    negative_sampling_rate: float | None = None,
    onnx_table_limit_bytes: int = ONNX_TABLE_LIMIT_BYTES,
    mlp_precision: str = "float32",
) -> dict[str, Any]:
    """Writes the export folder ``out_dir`` (see the module docstring) and returns its manifest.

    ``config`` is the run's config (resolved here against its data, as training resolved it).

    ``checkpoint``: ``latest``, ``best`` or a checkpoint path; None takes the run's best if early stopping
    marked one, else its latest (``recsys.checkpoint.resolve_checkpoint``).
    ``quantize``: None (fp32), "int8" or "int4"; the manifest then compares size and test AUC with fp32.
    ``mlp_precision``: "bfloat16" traces model.pt with its MLPs (and cross nets) computing in bfloat16:
    about half the MLP's time on CPUs with AVX512-BF16 or AMX, slower than float32 on others (``recsys
    serve`` warns there); the manifest compares its test AUC with float32's. ONNX and the torch.export
    programs stay float32.
    ``negative_sampling_rate``: the fraction of negatives training kept (1.0 = all; None: the run's
    ``data.negative_downsampling``); the served probabilities are corrected for it.
    """
    check_supported(config, quantize, onnx, program)
    config = resolve_config(config)
    if negative_sampling_rate is None:
        negative_sampling_rate = config.data.negative_downsampling
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize must be one of {sorted(QUANTIZE)}, got {quantize!r}")
    if mlp_precision not in MLP_PRECISIONS:
        raise ExportError(f"--mlp-precision must be one of {list(MLP_PRECISIONS)}, got {mlp_precision!r}")
    if mlp_precision == "bfloat16" and quantize:
        raise ExportError("--mlp-precision bfloat16 goes with fp32 tables: a quantized export's MLP keeps int8 "
                          "weights and computes in float32")
    if not 0 < negative_sampling_rate <= 1:
        raise ExportError(f"negative_sampling_rate must be in (0, 1], got {negative_sampling_rate}")
    out = Path(out_dir)
    _check_destination(out)
    checkpoint = resolve_checkpoint(config.training.run_dir, checkpoint)
    started = time.perf_counter()
    model = load_unsharded(config, checkpoint)
    schema, vocab = serving_preprocessing(config)
    features = {"dense": config.data.dense_features, "sparse": config.data.sparse_features,
                "multi_hot": list(schema["multi_hot"])}  # fmt: skip
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "checkpoint": checkpoint,
        "step": int(read_tensors(checkpoint, "progress.").get("step", torch.tensor(-1))),
        "metrics": _run_metrics(config.training.run_dir),
        "features": features,
        "preprocessing": {
            "schema": schema,
            "dense": ("log1p(max(x, 0))" if schema["dense_transform"] == "log1p" else "x") + "; missing, NaN or inf -> 0",
            "ids": _id_rules(schema, features["sparse"], config.model.num_embeddings),
            "vocab_dir": "vocab" if vocab else None,
        },
        "negative_sampling_rate": negative_sampling_rate,
        "model": {"file": MODEL_FILE, "quantization": quantize or "fp32", "mlp_precision": mlp_precision,
                  "entries": {"forward": "(dense [B, F_dense] float32, KeyedJaggedTensor) -> [B] probabilities",
                              "score_tensors": "(dense [B, F_dense] float32, values [L] int64 feature-major, "
                                               "lengths [F_sparse, B] int) -> [B] probabilities"}},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # mkdir, not mkdtemp: the umask's permissions
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # A full disk names the export, not its temporary folder, which is removed whatever happens.
    with naming_path(out, over_temporary=True), contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        if vocab:
            shutil.copytree(vocab, tmp / "vocab", ignore=shutil.ignore_patterns("vocab.json"))
        fp32 = script_model(model, manifest)
        served = fp32
        if quantize:
            served = script_model(model, manifest, quantize, model_spec(config))
        elif mlp_precision == "bfloat16":
            with products_in_bfloat16(model):
                served = script_model(model, manifest)
        save_script(served, tmp / MODEL_FILE)
        manifest["model"]["bytes"] = (tmp / MODEL_FILE).stat().st_size
        if quantize:
            manifest["quantization"] = _compare_quantized(fp32, manifest, config, tmp)
        if mlp_precision == "bfloat16":
            fp32_auc, auc = split_aucs([fp32, served], config)
            manifest["model"]["bfloat16_vs_float32"] = {"test_auc": auc, "fp32_test_auc": fp32_auc, "auc_drop": fp32_auc - auc}
        if onnx:
            manifest["onnx"] = export_onnx(model, manifest, tmp / ONNX_FILE, onnx_table_limit_bytes)
            manifest["onnx"]["max_abs_error_vs_torchscript"] = check_onnx(tmp / ONNX_FILE, fp32, model, config, manifest["onnx"])
        if program:  # "torch_export" or "aoti": recsys.serving.exported (fp32 tables only)
            manifest["torch_export"] = _programs(model, manifest, fp32, config, tmp, aoti=program == "aoti")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        seal(tmp, manifest)
        _publish(tmp, out)
    return manifest


def _programs(model: torch.nn.Module, manifest: dict, fp32: torch.jit.ScriptModule, config: Config, folder: Path, aoti: bool) -> dict:
    """model.pt2 (torch.export) and with ``aoti`` model_aoti.pt2, checked against TorchScript on test rows."""
    from recsys.serving.exported import write_programs

    parity = _parity_inputs(config, bad_ids=True)
    with torch.no_grad(), _quiet():
        return write_programs(_stacked(model, manifest), folder, parity, fp32.score_tensors(*parity).numpy(), aoti)


def _stacked(model: torch.nn.Module, serving: dict) -> OnnxModel:
    """The whole model over one stacked table, plain tensors in (what ONNX and torch.export carry)."""
    ids, features = serving["preprocessing"]["ids"], serving["features"]
    return OnnxModel(model, [ids["table_rows"][f] for f in features["sparse"]], ids["oov_rows"], serving["negative_sampling_rate"])


def _compare_quantized(fp32: torch.jit.ScriptModule, manifest: dict, config: Config, folder: Path) -> dict:
    """Size and test AUC of the quantized model.pt against the fp32 model (saved aside to measure it)."""
    fp32_path = folder / ".model_fp32.pt"
    save_script(fp32, fp32_path)
    fp32_bytes = fp32_path.stat().st_size
    fp32_path.unlink()
    quantized_bytes = manifest["model"]["bytes"]
    fp32_auc, auc = split_aucs([fp32, torch.jit.load(str(folder / MODEL_FILE))], config)
    return {"dtype": manifest["model"]["quantization"], "bytes": quantized_bytes, "fp32_bytes": fp32_bytes,
            "size_ratio": round(fp32_bytes / quantized_bytes, 3), "test_auc": auc, "fp32_test_auc": fp32_auc,
            "auc_drop": fp32_auc - auc}  # fmt: skip
