"""Typed run configuration: YAML files in configs/ loaded into plain dataclasses.

A config has nine sections (data, model, loss, optimizer, schedule, training, early_stopping, sharding,
logging). Files are read with ``yaml.safe_load``; ``key.sub=value`` overrides from the command line are
applied on top (the value is parsed as YAML, so ``model.deep_layers=[64,32]`` and ``training.epochs=2``
work). Unknown keys and wrong types fail with a ``ConfigError`` that names the key and lists the valid ones.

What a run's data decides (the feature lists and the table sizes) is left unset here: ``recsys.resolve``
fills it in from the shards' ``metadata.json`` before any command uses the config (``resolve_config``).
This module imports no torch, so preprocessing and the CLI parse configs without it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from recsys.config_fields import (  # noqa: F401 (UserError, ConfigError and read_yaml are imported from here too)
    FRACTION,
    POSITIVE,
    ConfigError,
    UserError,
    build_dataclass,
    read_yaml,
    setting,
)
from recsys.models.config import ModelConfig, validate_model
from recsys.models.tables import table_features, table_name


@dataclass
class DataConfig:
    """Where the data is and how it is batched.

    ``train``/``val``/``test`` are the split folders of a ``recsys preprocess`` output (memory-mapped), or raw
    input files, which are preprocessed with the schema ``schema`` into ``cache_dir`` (default: the run
    directory) first, and reused from there while they are unchanged (``recsys.data.shard_cache``).
    ``dense_features`` / ``sparse_features`` empty (the default): the shards' features; given, they must equal
    the shards' (``recsys.resolve``). ``batch_size`` and ``eval_batch_size`` are global: each of N processes
    takes ``batch_size / N`` rows of every batch (``batch_size`` must divide by N), so a config trains the same
    batches on any number of processes (``per_rank``).
    """

    train: str = "data/synthetic/shards/train"
    val: str = "data/synthetic/shards/val"
    test: str = "data/synthetic/shards/test"
    schema: str = "criteo"
    cache_dir: str = ""
    dense_features: list[str] = field(default_factory=list)
    sparse_features: list[str] = field(default_factory=list)
    batch_size: int = setting(4096, low=1)
    eval_batch_size: int = setting(16384, low=1)
    shuffle: bool = True
    drop_last: bool = False
    # Batches built ahead in a loader thread. null: 2 on a GPU or where the process has a core beyond its
    # intra-op threads, else 0 (``recsys.data.shards.prefetch_depth``: a third thread on the two intra-op
    # threads' cores stalls their parallel regions; tools/bench_models.py measured the difference).
    prefetch_batches: int | None = setting(None, low=0, zero="batches built in the training thread",
                                           none="2 unless the intra-op threads use every core")
    # Fraction w of the train split's negatives kept (seeded by training.seed; positives all kept). Eval and
    # export correct the probabilities back: p' = p / (p + (1 - p) / w). 1.0 = no downsampling.
    negative_downsampling: float = setting(1.0, low=0, low_open=True, high=1)
    # Column whose raw ids group rows for GAUC (e.g. a user id): the preprocessing schema's `group` (e.g.
    # configs/schemas/synthetic_users.yaml for `recsys generate --users N`). Empty = no GAUC.
    group_column: str = ""
    # Ids per row of each sparse feature (MLPerf's multi-hot sizes): the pooling factors of the planner's cost
    # model. Empty: what the shards' multi-hot expansion recorded, else 1 (one-hot).
    multi_hot_sizes: list[int] = setting(list, low=1)

    def per_rank(self, world_size: int) -> tuple[int, int]:
        """(training, evaluation) rows per rank and batch on ``world_size`` processes."""
        if self.batch_size % world_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is the global batch and must divide by the "
                              f"{world_size} processes; use a multiple of {world_size}")
        return self.batch_size // world_size, -(-self.eval_batch_size // world_size)


@dataclass
class LossConfig:
    """Training loss on the logits: BCE, optionally class-weighted, or focal loss (Lin et al., 2017).

    ``pos_weight`` multiplies the positives' terms (both losses). Focal: ``(1 - p_t)^focal_gamma`` scales
    each row's BCE; ``focal_alpha`` in [0, 1] weights positives by alpha and negatives by 1 - alpha, and a
    negative value leaves the classes unweighted (torchvision's convention).
    """

    name: str = "bce"
    pos_weight: float = setting(1.0, **POSITIVE)
    focal_gamma: float = setting(2.0, low=0)
    focal_alpha: float = setting(-1.0, high=1)  # negative: no class weighting


@dataclass
class OptimizerConfig:
    """Sparse (embedding) parameters use a fused FBGEMM optimizer applied in backward; dense ones Adam."""

    sparse: str = "adagrad"
    sparse_lr: float = setting(0.05, **POSITIVE)
    sparse_eps: float = setting(1e-8, **POSITIVE)
    dense: str = "adam"
    dense_lr: float = setting(1e-3, **POSITIVE)
    dense_weight_decay: float = setting(0.0, low=0)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: one factor per step multiplies the base rate of each optimizer in
    ``apply_to`` (``optimizer.dense_lr``, ``optimizer.sparse_lr``), through TorchRec's WarmupOptimizer.

    ``name``: constant; cosine / linear (from 1 down to ``min_factor`` at the last step); step
    (``step_gamma`` every ``step_size`` steps); plateau (``plateau_factor`` after ``plateau_patience``
    validations without improvement of ``early_stopping.monitor``, down to ``min_factor``). Decays count
    steps from the start of the run; the first ``warmup_steps`` ramp linearly from
    ``warmup_start_factor`` to the decayed factor.
    """

    name: str = "constant"
    warmup_steps: int = setting(0, low=0, zero="no warmup")
    warmup_start_factor: float = setting(0.0, **FRACTION)
    min_factor: float = setting(0.0, **FRACTION)
    step_size: int = setting(0, low=0, zero="no step decay; name=step needs > 0")
    step_gamma: float = setting(0.1, low=0, low_open=True, high=1)
    plateau_factor: float = setting(0.5, low=0, low_open=True, high=1, high_open=True)
    plateau_patience: int = setting(1, low=1)
    apply_to: list[str] = field(default_factory=lambda: ["dense", "sparse"])


@dataclass
class TrainingConfig:
    """How long to train, when to validate and checkpoint, and where.

    ``max_steps`` (null: no limit) ends the run early; ``eval_every_steps`` / ``checkpoint_every_steps`` add
    validations / checkpoints every that many steps (0: off; each epoch end validates and checkpoints
    anyway). ``nonfinite_patience``: consecutive steps whose loss is NaN or infinite that stop the run (1: the
    first one); steps with such a loss are never checkpointed.
    """

    # Intra-op threads for FBGEMM's CPU table backward (0: as many as the rest of the step). Its loop over
    # tables scales badly: 8.5 ms on one thread vs 13 ms on two per step on a 2-core box.
    table_backward_threads: int = setting(1, low=0, zero="the step's own thread count")
    epochs: int = setting(1, low=1)
    max_steps: Optional[int] = setting(None, low=1, none="no limit: the epochs decide")
    eval_every_steps: int = setting(0, low=0, zero="off")
    checkpoint_every_steps: int = setting(0, low=0, zero="off")
    nonfinite_patience: int = setting(1, low=1)
    seed: int = setting(0, low=0)
    run_dir: str = "runs/default"
    resume: bool = True
    keep_last_checkpoints: int = setting(3, low=1)
    # Validations per epoch, evenly spaced (MLPerf: 20); used when eval_every_steps is 0.
    evals_per_epoch: int = setting(0, low=0, zero="off")
    # Stop at the first validation whose AUC reaches this (MLPerf DLRM-DCNv2: 0.80275) and record the time to
    # it (metrics.jsonl stage "target", and the final line).
    target_auc: float = setting(0.0, low=0, high=1, high_open=True, zero="no target")


@dataclass
class EarlyStoppingConfig:
    """Stop when ``monitor`` on the val split has not improved by more than ``min_delta`` for ``patience``
    validations in a row (every ``training.eval_every_steps`` and each epoch end). The best validation's
    checkpoint is marked ``best`` (never pruned); eval and export default to it, and the final val/test
    metrics are the best model's. ``monitor`` is also what ``schedule.name=plateau`` watches."""

    enabled: bool = False
    monitor: str = "auc"
    patience: int = setting(2, low=1)
    min_delta: float = setting(0.0, low=0)


# TorchRec's ShardingType / EmbeddingComputeKernel values a config may name.
SHARDING_TYPES = ("data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")
COMPUTE_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching")


@dataclass
class TableShardingConfig:
    """Planner constraints for one table (``ParameterConstraints``); empty lists leave the choice open.

    ``cache_load_factor`` is the fraction of the table's rows the ``fused_uvm_caching`` kernel keeps in
    device memory (0 = TorchRec's default). ``min_partition`` is the narrowest column-wise shard.
    """

    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)
    cache_load_factor: float = setting(0.0, low=0, high=1, zero="TorchRec's default")
    min_partition: int = setting(0, low=0, zero="no minimum; else a multiple of 4")


@dataclass
class ShardingConfig:
    """Topology and placement hints for TorchRec's planner.

    ``device_memory_gb`` caps what the planner may place on one rank's device (HBM on CUDA; on CPU the
    rank's share of host memory); 0 = the device's own size (TorchRec's default on CPU). ``sharding_types``
    / ``compute_kernels`` restrict every table; ``tables`` maps a table name (``t_<feature>`` or a shared
    table's name) or a feature name to constraints of its own, which replace the global lists.
    """

    compute_device: str = "auto"
    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)
    device_memory_gb: float = setting(0.0, low=0, zero="the device's own size")
    host_memory_gb: float = setting(0.0, low=0, zero="the host's own size")
    tables: dict[str, TableShardingConfig] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    tensorboard: bool = True
    log_every_steps: int = setting(50, low=0, zero="at epoch ends only")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Every option list a config can name, defined once. Registries that map the names to code
# (the models of ``recsys.models.registry``, ``recsys.models.layers.ACTIVATIONS``, the optimizers of
# ``recsys.distributed.optimizers``) are declared through ``registry`` and so cannot drift from these; sharding types and kernels are checked against
# TorchRec's enums by ``recsys.distributed.planning``.
CHOICES = {
    "model.name": ("deepfm", "dlrm", "dcnv2", "dlrm_dcnv2"),
    "model.dcnv2.structure": ("parallel", "stacked"),
    "model.pooling": ("sum", "mean"),
    "model.activation": ("relu", "gelu", "tanh", "sigmoid"),
    "model.mlp_precision": ("float32", "bfloat16", "auto"),
    "loss.name": ("bce", "focal"),
    "schedule.name": ("constant", "cosine", "linear", "step", "plateau"),
    "early_stopping.monitor": ("auc", "logloss", "gauc"),
    "optimizer.sparse": ("adagrad", "rowwise_adagrad", "adam", "sgd"),
    "optimizer.dense": ("adam", "adagrad", "sgd"),
    "sharding.compute_device": ("auto", "cpu", "cuda"),
}

T = typing.TypeVar("T")


def registry(key: str, mapping: dict[str, T]) -> dict[str, T]:
    """``mapping`` (name -> implementation) after checking that it covers exactly ``CHOICES[key]``."""
    if set(mapping) != set(CHOICES[key]):
        raise TypeError(f"registry for {key} has {sorted(mapping)}, config.CHOICES lists {sorted(CHOICES[key])}")
    return mapping


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c.d=[1,2]"]`` -> nested dict, values parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = " ".join(str(e).split())
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it "
                              f"({dotted.strip()}=\"'{raw}'\") or fix the brackets") from None
        _set_path(tree, dotted.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    merged = _merge(values or {}, parse_overrides(overrides or []))
    config = build_dataclass(Config, merged, "", CHOICES)
    validate(config)
    return config


def _yaml_kind(value: Any) -> str:
    return "list" if isinstance(value, list) else f"scalar ({type(value).__name__} {str(value)[:40]!r})"


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config and applies ``key.sub=value`` overrides; raises ConfigError on any mismatch."""
    path = Path(path)
    values = read_yaml(path)
    if values is None:
        values = {}  # an empty file: every default
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: not a config file: it holds a YAML {_yaml_kind(values)}, not a mapping of "
                          f"sections ({', '.join(f.name for f in dataclasses.fields(Config))})")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# FBGEMM's CPU embedding kernels implement only these fused optimizers (its Adam is CUDA-only).
CPU_SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")


def check_device(config: Config, device_type: str) -> None:
    """Refuses in one line, naming the override, what ``device_type`` ("cpu"/"cuda") cannot run: a run
    fails here, before preprocessing or building the model, not in FBGEMM's kernel lookup."""
    sparse = config.optimizer.sparse
    if device_type == "cpu" and sparse not in CPU_SPARSE_OPTIMIZERS:
        others = ", ".join(CPU_SPARSE_OPTIMIZERS[1:])
        raise ConfigError(f"optimizer.sparse={sparse} has no FBGEMM CPU kernel: use optimizer.sparse="
                          f"{CPU_SPARSE_OPTIMIZERS[0]} (or {others}), or a GPU")


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express. Checks that need the sparse features run once
    they are known: at load time when the config lists them, else on the resolved config; checks that need
    the device run here when the config names it (``sharding.compute_device=cpu``), else once it is known
    (``check_device``)."""
    model, data = config.model, config.data
    if config.sharding.compute_device == "cpu":
        check_device(config, "cpu")
    if isinstance(model.num_embeddings, list):
        if data.sparse_features and len(model.num_embeddings) != len(data.sparse_features):
            raise ConfigError(
                f"model.num_embeddings has {len(model.num_embeddings)} entries but data.sparse_features has "
                f"{len(data.sparse_features)}"
            )
        if any(n <= 0 for n in model.num_embeddings):
            raise ConfigError("model.num_embeddings must be positive")
    elif model.num_embeddings < 0:
        raise ConfigError("model.num_embeddings must be positive, or 0 for the data's sizes")
    seen: set[str] = set()
    for table, features in model.shared_tables.items():
        for feature in features:
            if data.sparse_features and feature not in data.sparse_features:
                raise ConfigError(f"model.shared_tables.{table}: unknown sparse feature {feature!r}")
            if feature in seen:
                raise ConfigError(f"model.shared_tables: feature {feature!r} is in more than one table")
            seen.add(feature)
    if data.multi_hot_sizes and data.sparse_features and len(data.multi_hot_sizes) != len(data.sparse_features):
        raise ConfigError(f"data.multi_hot_sizes has {len(data.multi_hot_sizes)} entries but there are "
                          f"{len(data.sparse_features)} sparse features")
    validate_model(model)
    _validate_recipe(config)
    _validate_sharding(config)


# FBGEMM fuses every table of a kernel into one module with a single learning rate (set from the fused
# optimizer's param_groups[0]["lr"] at each zero_grad/step), so a schedule reaches all sparse tables or none.
SCHEDULE_TARGETS = ("dense", "sparse")


def _validate_recipe(config: Config) -> None:
    schedule, stopping = config.schedule, config.early_stopping
    for target in schedule.apply_to:
        if target not in SCHEDULE_TARGETS:
            raise ConfigError(
                f"schedule.apply_to: {target!r} is not one of {list(SCHEDULE_TARGETS)}; FBGEMM keeps one "
                "learning rate for all tables fused into a kernel, so a schedule cannot single out tables"
            )
    if schedule.name == "step" and schedule.step_size <= 0:
        raise ConfigError("schedule.name=step needs schedule.step_size > 0 (steps between decays)")
    watched = stopping.enabled or schedule.name == "plateau"
    if watched and stopping.monitor == "gauc" and not config.data.group_column:
        raise ConfigError("early_stopping.monitor=gauc needs data.group_column (the column GAUC groups by)")


def _validate_sharding(config: Config) -> None:
    sharding = config.sharding
    features = config.data.sparse_features
    in_shared = {f for group in config.model.shared_tables.values() for f in group}
    tables = list(table_features(features, config.model.shared_tables))
    entries = {"sharding": sharding, **{f"sharding.tables.{k}": v for k, v in sharding.tables.items()}}
    for key, entry in entries.items():
        for value in entry.sharding_types:
            if value not in SHARDING_TYPES:
                raise ConfigError(f"{key}.sharding_types: {value!r} is not one of {list(SHARDING_TYPES)}")
        for value in entry.compute_kernels:
            if value not in COMPUTE_KERNELS:
                raise ConfigError(f"{key}.compute_kernels: {value!r} is not one of {list(COMPUTE_KERNELS)}")
    resolved: dict[str, str] = {}
    for name, entry in sharding.tables.items():
        if entry.min_partition % 4:
            raise ConfigError(f"sharding.tables.{name}.min_partition must be a multiple of 4")
        if not features:
            continue  # table names are checked on the resolved config
        table = name if name in tables else table_name(name)
        if table in resolved:
            raise ConfigError(f"sharding.tables: {resolved[table]!r} and {name!r} name the same table {table!r}")
        resolved[table] = name
        if name not in tables and name not in features:
            raise ConfigError(f"sharding.tables: {name!r} is neither a table {tables} nor a sparse feature")
        if name in in_shared:
            raise ConfigError(f"sharding.tables.{name}: feature is in shared table; constrain the table instead")
