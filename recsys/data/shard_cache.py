"""Raw input files named by ``data.train``/``val``/``test`` -> a cached, preprocessed shard folder.

Training and evaluation read preprocessed shards only. When a config names raw files (Criteo TSV, ``.gz``,
a schema CSV) instead of shard folders, :func:`cached_shards` first runs preprocessing on them
(``recsys.data.preprocess.run``, split ``files``, with the schema ``data.schema``: vocab or hash ids as the
schema says) into ``<data.cache_dir or training.run_dir>/shards-<fingerprint>/`` and hands back its split
folders. The fingerprint is preprocessing's own (schema, settings, input paths, sizes and mtimes, tool
version): a folder is reused while it is complete and its fingerprint current; a changed input or schema
gets a new folder.

Several processes may ask at once (the ranks of a torchrun job, an eval beside a training): the first to
take an exclusive lock on ``.shards-<fingerprint>.lock`` preprocesses, the others wait on the lock and then
reuse the folder. This runs before the process group forms, so no collective times out meanwhile; on nodes
that do not share the folder each node preprocesses its own copy (the output is deterministic).
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from recsys.config import Config, ConfigError
from recsys.data.preprocess import Settings, run, summarize
from recsys.data.preprocess.pipeline import fingerprint
from recsys.data.preprocess.sources import make_sources
from recsys.data.schema import load_schema

SPLITS = ("train", "val", "test")


def _is_main() -> bool:
    """Rank 0 of a torchrun job (or a lone process): the one that reports a reused cache."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created if needed) until the block ends."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _complete(out: Path, fp: str) -> bool:
    """True when ``out`` holds a finished preprocessing output of fingerprint ``fp`` (metadata.json is
    written last; damaged shard files are ``recsys train --verify``'s business)."""
    try:
        return json.loads((out / "metadata.json").read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def cached_shards(config: Config, paths: dict[str, str]) -> dict[str, str]:
    """The shard split folder for each raw input file in ``paths`` (``{"train": file, ...}``), preprocessing
    them first unless a current cached output exists (see the module docstring).

    A file named by several keys (``data.val`` = ``data.test``) is preprocessed once, as the split of the
    first key naming it; that key's split folder then serves all of them.
    """
    data = config.data
    split_of: dict[str, str] = {}
    for key in SPLITS:
        if key in paths:
            split_of.setdefault(os.path.abspath(paths[key]), key)
    if "train" not in split_of.values():
        raise ConfigError("data.train must name the training file")
    schema = load_schema(data.schema)
    settings = Settings(out="", inputs=[f"{split}={path}" for path, split in split_of.items()], split="files",
                        progress=config.logging.progress_bar)
    fp = fingerprint(settings, schema, make_sources(settings, schema)[0])
    root = Path(data.cache_dir or config.training.run_dir)
    out = root / f"shards-{fp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        key = "data.cache_dir" if data.cache_dir else "training.run_dir"
        raise ConfigError(f"{key}={root}: cannot create it ({e.strerror}: {e.filename}); it holds the shards "
                          "preprocessed from the raw files in data.train/val/test") from None
    with _exclusive(root / f".shards-{fp}.lock"):
        if not _complete(out, fp):
            print(f"data.train/val/test are raw files: preprocessing them ({data.schema} schema) into {out}",
                  flush=True)
            print(summarize(run(replace(settings, out=str(out)), schema)), flush=True)
        elif _is_main():
            print(f"data.train/val/test: reusing their preprocessed shards in {out}", flush=True)
    return {key: str(out / split_of[os.path.abspath(path)]) for key, path in paths.items()}
