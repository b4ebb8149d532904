"""A run's config resolved against its data: the one place every command turns a loaded config into the
config it runs.

``load_config`` reads what the user wrote; what the data decides is filled in here, once, by
``resolve_config``: the dense and sparse feature lists and one table size per sparse feature. Training,
evaluation, export and ``recsys plan`` all start from ``resolve_config`` (``recsys.train.build_job``,
``recsys.export.export_model``, ``recsys.distributed.planning.dry_run``), and the model reads its table sizes
from the resolved ``model.num_embeddings`` (``recsys.models.registry.build_model``). The resolved config is
what a run saves as ``RUN_DIR/config.yaml``; resolving it again changes nothing.

Policy: what the shards say is never silently replaced, and never silently replaces what the config says.

* Shard folders (``recsys preprocess``): features and table sizes come from their ``metadata.json``. A config
  that leaves ``data.*_features`` empty and ``model.num_embeddings`` at 0 (the defaults) takes them; one that
  gives them must agree with the shards, else a ``ConfigError`` names the features that differ.
* Raw input files (Criteo TSV, ``.gz``, a schema CSV): preprocessed first with the schema ``data.schema`` into
  a cached shard folder (``recsys.data.shard_cache``), whose split folders replace them; then as above.
  Training reads shards only.
* No data at all (``recsys plan`` before the data exist): the schema's columns (``configs/schemas/``, their
  one definition) unless the config lists features, and ``model.num_embeddings`` rows per feature
  (``ABSENT_DATA_TABLE_ROWS`` when 0).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from recsys.config import Config, ConfigError, validate
from recsys.data.schema import load_schema
from recsys.data.shards import is_shard_split, read_metadata

# Rows per feature's table when the data is absent and model.num_embeddings is 0 (recsys plan).
ABSENT_DATA_TABLE_ROWS = 100_000


def resolve_config(config: Config) -> Config:
    """``config`` with ``data.dense_features``, ``data.sparse_features`` and ``model.num_embeddings`` (one
    size per sparse feature) taken from the data, then validated as a whole.

    Raises ConfigError when shard folders and raw files are mixed, a path is missing or a folder that is not
    a preprocessed split, the splits come from different preprocessing runs, or features or sizes given in
    the config disagree with the shards.
    """
    data = config.data
    paths = {key: getattr(data, key) for key in ("train", "val", "test") if getattr(data, key)}
    if any(Path(path).exists() for path in paths.values()):
        paths = _shard_splits(config, paths)
        data = dataclasses.replace(data, **paths)
        dense, sparse, sizes, multi_hot = _from_shards(dataclasses.replace(config, data=data), paths)
    else:
        schema = load_schema(data.schema)
        dense, sparse = data.dense_features or schema.dense, data.sparse_features or schema.sparse
        sizes = _per_feature(config.model.num_embeddings or ABSENT_DATA_TABLE_ROWS, sparse)
        multi_hot = []
    resolved = dataclasses.replace(
        config,
        data=dataclasses.replace(data, dense_features=list(dense), sparse_features=list(sparse),
                                 multi_hot_sizes=data.multi_hot_sizes or multi_hot),
        model=dataclasses.replace(config.model, num_embeddings=sizes),
    )
    validate(resolved)
    return resolved


def _per_feature(sizes: int | list[int], sparse: list[str]) -> list[int]:
    if isinstance(sizes, int):
        return [sizes] * len(sparse)
    if len(sizes) != len(sparse):
        raise ConfigError(f"model.num_embeddings has {len(sizes)} entries but there are {len(sparse)} sparse "
                          f"features {sparse}")
    return list(sizes)


def _shard_splits(config: Config, paths: dict[str, str]) -> dict[str, str]:
    """The split folders the data paths name, raw files replaced by their cached preprocessing."""
    for key, path in paths.items():
        if not Path(path).exists():
            raise ConfigError(f"data.{key}={path}: no such file or folder")
        if Path(path).is_dir() and not is_shard_split(path):
            raise ConfigError(f"data.{key}={path} is a folder but not a preprocessed split (no metadata.json in "
                              "its parent): run `recsys preprocess` on the raw files, or name them")
    sharded = {key for key, path in paths.items() if is_shard_split(path)}
    if not sharded:
        # Imported here: it brings the preprocessing tool (polars, its workers), which shard paths never need.
        from recsys.data.shard_cache import cached_shards

        return cached_shards(config, paths)
    if sharded != set(paths):
        raise ConfigError(f"data.{sorted(sharded)} are shard folders but data.{sorted(set(paths) - sharded)} are "
                          "raw files: use the splits of one `recsys preprocess` output, or raw files throughout")
    return paths


def _from_shards(config: Config, paths: dict[str, str]) -> tuple[list[str], list[str], list[int], list[int]]:
    """Dense and sparse features, table sizes and the multi-hot sizes (empty: not recorded) of the shards."""
    data = config.data
    files = {key: Path(path).parent / "metadata.json" for key, path in paths.items()}
    metadata = {file: read_metadata(file) for file in set(files.values())}  # the splits usually share one
    if len({m["fingerprint"] for m in metadata.values()}) > 1:
        raise ConfigError(f"data.train/val/test come from different preprocessing runs: {paths}")
    meta = metadata[files["train"]]
    for key, path in paths.items():
        if Path(path).name not in meta["splits"]:
            raise ConfigError(f"data.{key}={path}: the dataset has splits {list(meta['splits'])}")
    features = meta["features"]
    source = f"the shards of {data.train} ({Path(data.train).parent / 'metadata.json'})"
    if data.group_column and data.group_column != features.get("group"):
        raise ConfigError(f"data.group_column={data.group_column!r} but {source} keep "
                          f"{'no group column' if not features.get('group') else repr(features['group'])}: "
                          "name it as `group` in the preprocessing schema")
    for kind in ("dense", "sparse"):
        given = getattr(data, f"{kind}_features")
        if given and given != list(features[kind]):
            raise ConfigError(f"data.{kind}_features={given} but {source} have {list(features[kind])}; leave "
                              f"data.{kind}_features unset to take the shards' features")
    sparse = list(features["sparse"])
    sizes = [int(meta["table_sizes"][f]) for f in sparse]
    if config.model.num_embeddings:
        given = _per_feature(config.model.num_embeddings, sparse)
        differ = [f"{f} {g:,} vs {n:,}" for f, g, n in zip(sparse, given, sizes) if g != n]
        if differ:
            more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            raise ConfigError(
                f"model.num_embeddings disagrees with {source} (config vs shards): {', '.join(differ[:5])}{more}; "
                "leave model.num_embeddings unset (0) to take the shards' table sizes, or preprocess with "
                "matching --hash-buckets"
            )
    expansion = meta.get("multi_hot_expansion") or {}
    return list(features["dense"]), sparse, sizes, list(expansion.get("sizes", []))
