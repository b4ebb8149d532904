"""The ``recsys`` command: generate data, preprocess logs into shards, train, evaluate, export."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from typing import Any

from recsys.config import UserError

# Before torch and the model load: `recsys predict` reports its rate over the whole command.
STARTED = time.perf_counter()
from recsys.install_check import check_install


def _generate(args: argparse.Namespace) -> int:
    from recsys.data.synthetic import SyntheticSpec, generate_splits

    oracle = generate_splits(args.out, args.rows, SyntheticSpec(seed=args.seed, num_users=args.users))
    print(f"wrote {args.rows:,} rows to {args.out}/{{train,val,test}}.tsv")
    for split, values in oracle.items():
        gauc = f" gauc={values['gauc']:.4f}" if "gauc" in values else ""
        print(f"  {split}: rows={values['rows']:,} ctr={values['ctr']:.4f} best achievable auc={values['auc']:.4f} logloss={values['logloss']:.4f}{gauc}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from recsys.data.preprocess.cli import main_from_args

    return main_from_args(args)


def _train(args: argparse.Namespace) -> int:
    from recsys.config import load_config
    from recsys.distributed.elastic import TrainingStopped
    from recsys.train import train

    try:
        train(load_config(args.config, args.overrides), verify=args.verify)
    except TrainingStopped as e:
        print(f"recsys: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's code for "killed by signal": the job did not finish
    return 0


def _eval(args: argparse.Namespace) -> int:
    from recsys.config import load_config
    from recsys.train import evaluate_checkpoint

    result = evaluate_checkpoint(load_config(args.config, args.overrides), args.split, args.checkpoint)
    print(json.dumps(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from recsys.config import load_config
    from recsys.export import export_model

    config = load_config(args.config, args.overrides)
    out = args.out or f"{config.training.run_dir}/export"
    manifest = export_model(config, out, args.checkpoint, quantize=args.quantize, onnx=args.onnx,
                             program=args.program, mlp_precision=args.mlp_precision)
    model = manifest["model"]
    print(f"exported {out}/ from {manifest['checkpoint']} (step {manifest['step']}): {model['file']} "
          f"({model['quantization']}{', bfloat16 MLP' if model['mlp_precision'] == 'bfloat16' else ''}, "
          f"{model['bytes'] / 2**20:.2f} MiB), manifest.json, preprocessing "
          f"({manifest['preprocessing']['ids']['mode']} ids)")
    if "quantization" in manifest:
        q = manifest["quantization"]
        print(f"  {q['dtype']}: {q['size_ratio']:.2f}x smaller than fp32 ({q['fp32_bytes'] / 2**20:.2f} MiB); test "
              f"AUC {q['test_auc']:.5f} vs fp32 {q['fp32_test_auc']:.5f} (drop {q['auc_drop']:.5f})")
    if "bfloat16_vs_float32" in model:
        b = model["bfloat16_vs_float32"]
        print(f"  bfloat16 MLP: test AUC {b['test_auc']:.5f} vs float32 {b['fp32_test_auc']:.5f} (drop {b['auc_drop']:.5f})")
    if "onnx" in manifest:
        o = manifest["onnx"]
        print(f"  {o['file']}: {o['carries']}; onnxruntime vs TorchScript max |diff| {o['max_abs_error_vs_torchscript']:.2g}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from recsys.serving.predict import predict, summarize

    report = predict(
        args.export, args.inputs, args.output, workers=args.workers, strict=args.strict,
        max_bad_fraction=args.max_bad_fraction, chunk_bytes=int(args.chunk_mb * 2**20),
        max_memory_gb=args.max_memory_gb, batch_size=args.batch_size, threads=args.threads,
        progress=not args.no_progress, verify=args.verify or None, labelled=not args.unlabelled,
        accept_truncated=args.accept_truncated, keep_columns=args.keep_columns, started=STARTED,
    )  # fmt: skip
    print(summarize(report))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from recsys.serving.server import ServeConfig, serve

    return serve(ServeConfig(args.export, host=args.host, port=args.port, workers=args.workers,
                             max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms, threads=args.threads,
                             backend=args.backend))


def _plan(args: argparse.Namespace) -> int:
    from recsys.config import load_config
    from recsys.distributed.planning import PlanError, dry_run, format_report

    try:
        config = load_config(args.config, args.overrides)
        device = args.compute_device or ("cpu" if config.sharding.compute_device == "cpu" else "cuda")
        report = dry_run(config, args.world_size, args.local_world_size or args.world_size, device,
                         args.device_memory_gb, args.host_memory_gb)  # fmt: skip
    except (PlanError, UserError) as e:
        if not args.json:
            if isinstance(e, PlanError):
                print(f"recsys: {args.config} does not fit: {e}", file=sys.stderr)
                return 1
            raise
        # --json: scripts read stdout as JSON whatever happened (exit status as without --json)
        print(json.dumps({"fits": False, "config": args.config, "error": " ".join(str(e).split())}))
        return 1 if isinstance(e, PlanError) else 2
    print(json.dumps({"fits": True, **report.as_dict()}) if args.json else format_report(report))
    return 0


def _at_least(low: float, kind: type) -> Any:
    """An argparse type: a ``kind`` number >= ``low`` (argparse prints the one-line usage error, exit 2)."""

    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError: argparse's "invalid int value: 'two'"
        if not value >= low:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _config_command(sub: Any, name: str, config_help: str, **kwargs: str) -> argparse.ArgumentParser:
    """A subcommand taking a YAML config and ``section.key=value`` overrides."""
    parser = sub.add_parser(name, **kwargs)
    parser.add_argument("config", help=config_help)
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. training.epochs=2 model.deep_layers=[64,32]"
    )
    return parser


def _checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", default=None, metavar="latest|best|PATH",
        help="which checkpoint of training.run_dir (default: the one early stopping marked best, else the latest)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors in input, files and paths (exit status 2 otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="write generated Criteo-format TSV (train/val/test) with a known ground truth",
        description="Writes OUT/{train,val,test}.tsv (80/10/10) in raw Criteo layout and OUT/oracle.json "
        "with the AUC/logloss of the true click probabilities (the best any model can do).",
    )
    gen.add_argument("--rows", type=int, default=1_000_000, help="total rows over all splits")
    gen.add_argument("--out", default="data/synthetic", help="output folder")
    gen.add_argument("--seed", type=int, default=0, help="seed of the planted model and the draws")
    gen.add_argument("--users", type=int, default=0,
                     help="add a 41st column: a user id among N, with a per-user click bias (for GAUC)")
    gen.set_defaults(func=_generate)

    from recsys.data.preprocess.cli import add_arguments

    pre = sub.add_parser(
        "preprocess",
        help="turn raw click logs (Criteo TSV, .gz, schema-described CSV) into memory-mapped shards",
        description="Parses, checks, transforms and splits raw logs on all cores in bounded memory and writes "
        "OUT/<split>/part-*/ shards plus OUT/metadata.json (table sizes that training reads). Re-running "
        "reuses finished work. Example: recsys preprocess --split files --out data/shards "
        "train=train.tsv val=val.tsv test=test.tsv",
    )
    add_arguments(pre)
    pre.set_defaults(func=_preprocess)

    tr = _config_command(
        sub,
        "train",
        "YAML config, e.g. configs/synthetic.yaml",
        help="train a model (model.name: DeepFM by default) from a YAML config",
        description="Trains, evaluating on the val split every training.eval_every_steps and at each epoch "
        "end (and stopping early with early_stopping.enabled), checkpointing into training.run_dir (and "
        "resuming from its latest checkpoint), then reports val and test metrics and draws run_dir/plots/. "
        "Run under torchrun/torchx for several processes.",
    )
    tr.add_argument("--verify", action="store_true",
                    help="check the sha256 of every file of the checkpoint it resumes from (sizes are always checked) and of every data shard")
    tr.set_defaults(func=_train)

    ev = _config_command(
        sub,
        "eval",
        "the YAML config the run was trained with",
        help="evaluate a checkpoint of a run (the best, else the latest)",
        description="Loads a checkpoint of training.run_dir (the one early stopping marked best, else the "
        "latest, or --checkpoint) and prints AUC/logloss/NE/calibration (and GAUC with data.group_column) on "
        "a split, with predictions corrected for negative downsampling.",
    )
    ev.add_argument("--split", choices=["val", "test"], default="test")
    _checkpoint_option(ev)
    ev.set_defaults(func=_eval)

    ex = _config_command(
        sub,
        "export",
        "the YAML config the run was trained with",
        help="export a checkpoint (the best, else the latest) as a self-contained serving folder",
        description="Reassembles sharded tables from a checkpoint (the one early stopping marked best, else the "
        "latest, or --checkpoint) into the unsharded model and "
        "writes, atomically, OUT/model.pt (TorchScript: forward(dense, KJT) and score_tensors(dense, values, "
        "lengths) -> probabilities), OUT/manifest.json (versions, checkpoint, metrics, features, "
        "preprocessing), OUT/vocab/ (vocab mode) and OUT/config.yaml.",
    )
    ex.add_argument("--out", default=None, help="output folder (default: <run_dir>/export)")
    ex.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="store the tables as FBGEMM row-wise int8 or int4 (TorchRec QuantEmbeddingBagCollection; "
                    "both have CPU kernels) and the MLP's weights as int8; reports size and test AUC against fp32")
    ex.add_argument("--onnx", action="store_true",
                    help="also write OUT/model.onnx (whole model, or the dense part when the tables exceed 1 GiB), "
                    "checked with onnxruntime against TorchScript")
    ex.add_argument("--program", choices=["torch_export", "aoti"], default=None,
                    help="also write OUT/model.pt2 (torch.export, fp32) and with aoti OUT/model_aoti.pt2 (AOTInductor, "
                    "about a minute to compile); `recsys serve --backend` runs them")
    ex.add_argument("--mlp-precision", choices=["float32", "bfloat16"], default="float32",
                    help="what model.pt's MLPs compute in: bfloat16 takes about half the MLP's time on CPUs with "
                    "AVX512-BF16 or AMX (slower on others); reports test AUC against float32. ONNX and --program "
                    "stay float32")
    _checkpoint_option(ex)
    ex.set_defaults(func=_export)

    from recsys.data.preprocess import Settings

    pr = sub.add_parser(
        "predict",
        help="score raw logs with an export folder: one click probability per row",
        description="Parses raw logs (TSV, .gz, schema CSV; with or without the label column) with exactly "
        "training's transforms, on all cores in bounded memory, and writes one row per input row, in order: the "
        "schema's id column if any, the label if present, and score. Bad rows are counted with file:line as in "
        "`recsys preprocess` and scored NaN in place. Example: recsys predict runs/synthetic/export "
        "data/synthetic/test.tsv --output scores.parquet",
    )
    pr.add_argument("export", help="folder written by `recsys export`")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="raw log files (plain or .gz)")
    pr.add_argument("--output", required=True, help="scores file, .csv or .parquet (written atomically)")
    pr.add_argument("--strict", action="store_true", help="fail at the first malformed row")
    pr.add_argument("--unlabelled", action="store_true",
                    help="the inputs (without a header) lack the label column; without it a file one column "
                    "short is refused, as a dropped column looks alike")
    pr.add_argument("--accept-truncated", action="store_true",
                    help="score the rows before the break of a truncated or corrupt .gz input instead of failing")
    pr.add_argument("--max-bad-fraction", type=float, default=Settings.max_bad_fraction,
                    help="fail when more than this fraction of lines is malformed (default 0.01)")
    pr.add_argument("--workers", type=int, default=0, help="parsing processes (default: all cores)")
    pr.add_argument("--chunk-mb", type=float, default=Settings.chunk_bytes / 2**20, help="input MiB per task")
    pr.add_argument("--max-memory-gb", type=float, default=Settings.max_memory_gb,
                    help="memory bound for parsing (fewer workers are used if needed); the model apart")
    pr.add_argument("--batch-size", type=int, default=16384, help="rows per model call")
    pr.add_argument("--threads", type=int, default=0,
                    help="the model's intra-op threads (default: the cores the workers leave, at least 1)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--verify", action="store_true",
                    help="compare the sha256 of every file of the export with its manifest (sizes are always "
                    "compared; checksums too by default when the files total at most 256 MiB)")
    pr.add_argument("--keep-columns", type=lambda text: [c.strip() for c in text.split(",") if c.strip()], default=[],
                    metavar="COL,COL", help="input columns copied next to each score, as read (e.g. user_id,item_id, "
                    "to join the scores back); the schema's id_column is always copied")
    pr.set_defaults(func=_predict)

    sv = sub.add_parser(
        "serve",
        help="online scoring over HTTP: batching, health/readiness probes, Prometheus metrics, export swap",
        description="Serves an export folder: POST /v1/score (JSON rows or columns, optional shared context; "
        "or an Arrow IPC stream) -> one probability per row, with predict's transforms; GET /healthz, /readyz, "
        "/metrics, /v1/model; POST /admin/reload or SIGHUP swaps in an export (a broken one is refused); "
        "SIGTERM drains in-flight requests and exits 0. See docs/serving_online.md.",
    )
    sv.add_argument("export", help="folder written by `recsys export`")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="server processes, each with its own model")
    sv.add_argument("--max-batch-rows", type=int, default=4096,
                    help="rows per model batch across requests; also the most rows one request may carry (413)")
    sv.add_argument("--max-wait-ms", type=float, default=1.0,
                    help="how long a batch waits after its first request for others being read (none being read: no wait)")
    sv.add_argument("--threads", type=int, default=1, help="the model's intra-op threads per worker")
    sv.add_argument("--backend", choices=["torchscript", "torch_export", "aoti"], default="torchscript",
                    help="the model file: model.pt (TorchScript), model.pt2 or model_aoti.pt2 (`recsys export --program`)")
    sv.set_defaults(func=_serve)

    pl = _config_command(
        sub,
        "plan",
        "YAML config",
        help="show where the planner puts every table on a cluster (dry run, nothing allocated)",
        description="Builds the model on the meta device and runs TorchRec's planner for the given topology: "
        "prints each table's sharding type, kernel, ranks and memory, and each rank's memory against its cap. "
        "Exits 1 naming the tables that cannot fit.",
    )
    pl.add_argument("--world-size", type=_at_least(1, int), required=True, help="total ranks (devices)")
    pl.add_argument("--local-world-size", type=_at_least(0, int), default=0, help="ranks per node (default 0: all on one)")
    pl.add_argument("--device-memory-gb", type=_at_least(0, float), default=None,
                    help="per-rank cap; default sharding.device_memory_gb, else the device's")
    pl.add_argument("--host-memory-gb", type=_at_least(0, float), default=None,
                    help="per-rank host memory cap for UVM tables on CUDA; default sharding.host_memory_gb, else "
                    "TorchRec's assumption (128 GiB per rank, whatever the host has), printed beside HBM")
    pl.add_argument("--compute-device", choices=["cuda", "cpu"], default=None, help="default cuda unless the config says cpu")
    pl.add_argument("--json", action="store_true",
                    help="print the plan as one JSON object, also on failure ({\"fits\": false, \"error\": ...})")
    pl.set_defaults(func=_plan)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``section.key=value`` overrides of config commands accepted anywhere after the
    config (``recsys eval CONFIG --split val data.eval_batch_size=8192``): argparse gives a ``nargs="*"``
    positional only the words before the first option, and cannot interleave them under subcommands
    (``parse_intermixed_args`` refuses subparsers), so the words it leaves over are taken here."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [word for word in rest if "=" in word and not word.startswith("-")]
        rest = [word for word in rest if word not in args.overrides]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


# OSErrors a user causes and can fix (a path, a full disk); any other error is a bug and keeps its traceback.
_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)
_DISK_HINTS = {errno.ENOSPC: "free space there or choose another path", errno.EDQUOT: "free space within your "
               "quota or choose another path", errno.EROFS: "choose a writable path"}  # fmt: skip


def _user_message(e: BaseException) -> str | None:
    """One line for an error the user caused, or None for a bug."""
    if isinstance(e, OSError) and not isinstance(e, _USER_OS_ERRORS) and e.errno not in _DISK_HINTS:
        return None
    if not isinstance(e, (UserError, OSError)):
        return None
    if isinstance(e, OSError) and e.filename is not None:
        hint = f": {_DISK_HINTS[e.errno]}" if e.errno in _DISK_HINTS else ""
        return f"{e.filename}: {e.strerror}{hint}"
    return " ".join(str(e).split())


# Commands that use neither TorchRec nor FBGEMM skip the check (preprocess, and its workers, import no torch).
_NO_TORCH = ("generate", "preprocess")


def main(argv: list[str] | None = None) -> int:
    """The ``recsys`` command (also what torchrun/TorchX workers run: ``python -m recsys.cli train``)."""
    from recsys.warnings_filter import install

    install()  # known third-party notices stay off the screen (RECSYS_WARNINGS=all shows them)
    args = parse_args(argv)
    try:
        if args.command not in _NO_TORCH:
            check_install()  # an incomplete install (e.g. a bare `pip install -e .`) fails here, saying how to fix it
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the commands write under temporary names, so nothing half-written stays
        if args.debug:
            raise
        print(f"recsys {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130  # the shell's code for SIGINT
    except Exception as e:
        message = None if args.debug else _user_message(e)
        if message is None:
            raise
        print(f"recsys {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
