"""Command line (``recsys preprocess`` and ``tools/preprocess_criteo.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsys.config import UserError
from recsys.data.multi_hot import LOOKUPS
from recsys.data.preprocess.base import FINGERPRINT_MODES, SPLIT_MODES, PreprocessError, Settings
from recsys.data.preprocess.pipeline import run, summarize
from recsys.data.schema import load_schema

# ----------------------------------------------------------------------------------------------------------
# Command line (``recsys preprocess`` and ``tools/preprocess_criteo.py``)


def _ratios(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=RATIO,..., e.g. train=7,val=2,test=1; got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="input files (plain or .gz); with --split files each is SPLIT=PATH. Or one folder: "
                        "TorchRec's Criteo day files (day_N_{labels,dense,sparse}.npy, day_N_sparse_multi_hot.npz), "
                        "indexed in place (read memory-mapped, no copy; the last day halved into val and test), or "
                        "expanded with --multi-hot-sizes; or a one-hot `recsys preprocess` output to expand")
    parser.add_argument("--out", required=True, help="output folder (metadata.json, <split>/part-*, vocab/)")
    parser.add_argument("--schema", default="criteo",
                        help="a schema in configs/schemas (criteo, avazu, ecommerce) or a YAML path")
    parser.add_argument("--split", choices=SPLIT_MODES, default="random",
                        help="random: seeded per-row split by --ratios; files: SPLIT=PATH inputs; days: all "
                        "inputs but the last are train, the last is halved into val and test (Terabyte)")
    parser.add_argument("--ratios", type=_ratios, default={"train": 0.8, "val": 0.1, "test": 0.1},
                        help="split ratios for --split random (default train=0.8,val=0.1,test=0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split and the shuffle")
    parser.add_argument("--shuffle", action="store_true", help="write each split uniformly shuffled")
    parser.add_argument("--sparse-mode", choices=("vocab", "hash"), help="override the schema's sparse_mode")
    parser.add_argument("--min-count", type=int, help="vocab mode: ids seen fewer times map to the OOV row")
    parser.add_argument("--hash-buckets", type=int, help="hash mode: table rows per feature")
    parser.add_argument("--dense-transform", choices=("log1p", "none"), help="override the schema's")
    parser.add_argument("--shard-rows", type=int, default=Settings.shard_rows, help="rows per output shard")
    parser.add_argument("--chunk-mb", type=float, default=Settings.chunk_bytes / 2**20,
                        help="input MiB parsed per task")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    parser.add_argument("--max-memory-gb", type=float, default=Settings.max_memory_gb,
                        help="memory bound for all processes together, vocabularies apart (fewer workers "
                        "are used if needed)")
    parser.add_argument("--strict", action="store_true", help="fail at the first malformed row")
    parser.add_argument("--max-bad-fraction", type=float, default=Settings.max_bad_fraction,
                        help="fail when more than this fraction of lines is malformed (default 0.01)")
    parser.add_argument("--accept-truncated", action="store_true",
                        help="keep the rows before the break of a truncated or corrupt .gz input (the loss is "
                        "reported in the summary and metadata.json) instead of failing")
    parser.add_argument("--fingerprint", choices=FINGERPRINT_MODES, default=Settings.fingerprint,
                        help="what identifies an input when deciding what a re-run reuses: stat (size and "
                        "mtime; default, free; misses a change that keeps both) or content (a hash of the bytes, "
                        "read once per run; for copied files whose mtimes lie)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out folder that holds files recsys preprocess did not write "
                        "(refused otherwise); files of the same name are replaced")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--multi-hot-sizes", metavar="SIZES",
                        help="MLPerf DLRM-DCNv2's multi-hot expansion of a one-hot folder input: ids per table, "
                        "comma-separated, or 'mlperf' (3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1)")
    parser.add_argument("--multi-hot-lookup", choices=LOOKUPS, default="reference",
                        help="reference: the reference script's lookup, byte for byte (drawn from --seed into "
                        "OUT/.lookup, memory-mapped; 23 GB for MLPerf's sizes); hash: the same law from a "
                        "counter-based generator, nothing stored")
    parser.add_argument("--table-sizes", metavar="SIZES", default="mlperf",
                        help="TorchRec day files: rows per table, ids taken modulo them as TorchRec's readers do "
                        "(comma-separated, or 'mlperf': Criteo 1TB capped at 40M; default)")


def _folder_input(args: argparse.Namespace) -> str:
    """Indexes TorchRec's day files in place, or expands a one-hot folder input; returns the summary."""
    from recsys.data.multi_hot import MLPERF_MULTI_HOT_SIZES, MLPERF_TABLE_SIZES, parse_sizes
    from recsys.data.preprocess.expand import expand, summarize_expansion
    from recsys.data.torchrec_days import DaysError, write_index

    folder = Path(args.inputs[0])
    is_days = not (folder / "metadata.json").is_file()
    try:
        tables = parse_sizes(args.table_sizes, "--table-sizes", MLPERF_TABLE_SIZES) if is_days else None
        if args.multi_hot_sizes is None:
            if not is_days:
                raise PreprocessError(f"{folder}: already a `recsys preprocess` output; pass --multi-hot-sizes to "
                                      "expand it")
            meta = write_index(folder, Path(args.out), tables)
            multi = "multi-hot (materialized .npz)" if meta["features"]["multi_hot"] else "one-hot"
            lines = [f"indexed {folder} in place into {args.out}/metadata.json ({multi}; ids modulo --table-sizes)"]
            lines += [f"  {split}: {info['rows']:,} rows from {', '.join(s['name'] for s in info['shards'])}"
                      for split, info in meta["splits"].items()]  # fmt: skip
            return "\n".join(lines)
        sizes = parse_sizes(args.multi_hot_sizes, "--multi-hot-sizes", MLPERF_MULTI_HOT_SIZES)
    except (ValueError, DaysError) as e:
        raise PreprocessError(str(e)) from None
    metadata = expand(str(folder), args.out, sizes, args.multi_hot_lookup, args.seed, tables, args.shard_rows,
                      args.workers, args.max_memory_gb, not args.no_progress)  # fmt: skip
    return summarize_expansion(metadata)


def main_from_args(args: argparse.Namespace) -> int:
    """Runs the tool for parsed arguments; prints a summary, or the error and exit status 2."""
    if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir():
        try:
            print(_folder_input(args))
        except UserError as e:
            print(f"recsys preprocess: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.multi_hot_sizes is not None:
        print("recsys preprocess: error: --multi-hot-sizes expands one-hot shards: preprocess the raw files first, "
              "then pass that output folder (or TorchRec's day files) as the input", file=sys.stderr)
        return 2
    overrides = {key: value for key, value in (
        ("sparse_mode", args.sparse_mode), ("min_count", args.min_count),
        ("hash_buckets", args.hash_buckets), ("dense_transform", args.dense_transform),
    ) if value is not None}  # fmt: skip
    settings = Settings(
        out=args.out, inputs=args.inputs, split=args.split, ratios=args.ratios, seed=args.seed,
        shuffle=args.shuffle, shard_rows=args.shard_rows, chunk_bytes=int(args.chunk_mb * 2**20),
        workers=args.workers, max_memory_gb=args.max_memory_gb, strict=args.strict,
        max_bad_fraction=args.max_bad_fraction, accept_truncated=args.accept_truncated,
        progress=not args.no_progress, fingerprint=args.fingerprint, overwrite=args.overwrite,
    )  # fmt: skip
    try:
        metadata = run(settings, load_schema(args.schema, overrides))
    except UserError as e:
        print(f"recsys preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summarize(metadata))
    return 0
