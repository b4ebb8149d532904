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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from recsys.models.config import ModelConfig, validate_model
from recsys.models.tables import table_features, table_name


class UserError(ValueError):
    """A problem the user can fix, named in the message (a file, key or path): the CLI prints the message
    and exits 2, without a traceback."""


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


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
    batch_size: int = 4096
    eval_batch_size: int = 16384
    shuffle: bool = True
    drop_last: bool = False
    prefetch_batches: int = 2
    # Fraction w of the train split's negatives kept (seeded by training.seed; positives all kept). Eval and
    # export correct the probabilities back: p' = p / (p + (1 - p) / w). 1.0 = no downsampling.
    negative_downsampling: float = 1.0
    # Column whose raw ids group rows for GAUC (e.g. a user id): the preprocessing schema's `group` (e.g.
    # configs/schemas/synthetic_users.yaml for `recsys generate --users N`). Empty = no GAUC.
    group_column: str = ""

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
    pos_weight: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float = -1.0


@dataclass
class OptimizerConfig:
    """Sparse (embedding) parameters use a fused FBGEMM optimizer applied in backward; dense ones Adam."""

    sparse: str = "adagrad"
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    dense: str = "adam"
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0


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
    warmup_steps: int = 0
    warmup_start_factor: float = 0.0
    min_factor: float = 0.0
    step_size: int = 0
    step_gamma: float = 0.1
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    apply_to: list[str] = field(default_factory=lambda: ["dense", "sparse"])


@dataclass
class TrainingConfig:
    # Intra-op threads for FBGEMM's CPU table backward (0: as many as the rest of the step). Its loop over
    # tables scales badly: 8.5 ms on one thread vs 13 ms on two per step on a 2-core box.
    table_backward_threads: int = 1
    epochs: int = 1
    max_steps: int = -1
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = True
    keep_last_checkpoints: int = 3


@dataclass
class EarlyStoppingConfig:
    """Stop when ``monitor`` on the val split has not improved by more than ``min_delta`` for ``patience``
    validations in a row (every ``training.eval_every_steps`` and each epoch end). The best validation's
    checkpoint is marked ``best`` (never pruned); eval and export default to it, and the final val/test
    metrics are the best model's. ``monitor`` is also what ``schedule.name=plateau`` watches."""

    enabled: bool = False
    monitor: str = "auc"
    patience: int = 2
    min_delta: float = 0.0


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
    cache_load_factor: float = 0.0
    min_partition: int = 0


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
    device_memory_gb: float = 0.0
    host_memory_gb: float = 0.0
    tables: dict[str, TableShardingConfig] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    tensorboard: bool = True
    log_every_steps: int = 50


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
# (the models of ``recsys.models.registry``, ``recsys.models.layers.ACTIVATIONS``, the optimizers of ``recsys.distributed.optimizers``) are declared
# through ``registry`` and so cannot drift from these; sharding types and kernels are checked against
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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Returns ``value`` converted to ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_value(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_check_value(k, key_tp, key): _check_value(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
            return float(value)  # PyYAML reads 1e-6 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value if value is not None else {}, key)
    raise TypeError(f"unsupported config type {tp} for {key}")


def build_dataclass(cls: type[T], values: dict[str, Any], prefix: str) -> T:
    """``cls(**values)`` with every value type-checked (nested dataclasses too) and every key known;
    ``prefix`` names the section in errors. Run configs and preprocessing schemas are both read this way."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {valid}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value or {}, key)
        else:
            kwargs[name] = _check_value(value, tp, key)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {list(CHOICES[key])}")
    return cls(**kwargs)


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
    config = build_dataclass(Config, merged, "")
    validate(config)
    return config


def read_yaml(path: Path, what: str = "config file") -> Any:
    """``yaml.safe_load`` of a file; a ConfigError naming it when it is missing or not YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config and applies ``key.sub=value`` overrides; raises ConfigError on any mismatch."""
    path = Path(path)
    values = read_yaml(path) or {}
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express. Checks that need the sparse features run once
    they are known: at load time when the config lists them, else on the resolved config."""
    model, data = config.model, config.data
    if model.embedding_dim <= 0:
        raise ConfigError("model.embedding_dim must be positive")
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
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError("model.dropout must be in [0, 1)")
    problems = validate_model(model)
    if problems:
        raise ConfigError("; ".join(problems))
    if data.batch_size <= 0 or data.eval_batch_size <= 0:
        raise ConfigError("data.batch_size and data.eval_batch_size must be positive")
    if config.training.table_backward_threads < 0:
        raise ConfigError("training.table_backward_threads must be >= 0 (0: the step's own thread count)")
    if config.training.keep_last_checkpoints < 1:
        raise ConfigError("training.keep_last_checkpoints must be at least 1")
    if not 0.0 < data.negative_downsampling <= 1.0:
        raise ConfigError("data.negative_downsampling must be in (0, 1] (the fraction of negatives kept)")
    _validate_recipe(config)
    _validate_sharding(config)


# FBGEMM fuses every table of a kernel into one module with a single learning rate (set from the fused
# optimizer's param_groups[0]["lr"] at each zero_grad/step), so a schedule reaches all sparse tables or none.
SCHEDULE_TARGETS = ("dense", "sparse")


def _validate_recipe(config: Config) -> None:
    loss, schedule, stopping = config.loss, config.schedule, config.early_stopping
    if loss.pos_weight <= 0:
        raise ConfigError("loss.pos_weight must be positive")
    if loss.focal_gamma < 0:
        raise ConfigError("loss.focal_gamma must be >= 0")
    if loss.focal_alpha > 1:
        raise ConfigError("loss.focal_alpha must be in [0, 1], or negative for no class weighting")
    for target in schedule.apply_to:
        if target not in SCHEDULE_TARGETS:
            raise ConfigError(
                f"schedule.apply_to: {target!r} is not one of {list(SCHEDULE_TARGETS)}; FBGEMM keeps one "
                "learning rate for all tables fused into a kernel, so a schedule cannot single out tables"
            )
    if schedule.warmup_steps < 0:
        raise ConfigError("schedule.warmup_steps must be >= 0")
    for key in ("warmup_start_factor", "min_factor"):
        if not 0.0 <= getattr(schedule, key) <= 1.0:
            raise ConfigError(f"schedule.{key} must be in [0, 1]")
    if schedule.name == "step" and schedule.step_size <= 0:
        raise ConfigError("schedule.name=step needs schedule.step_size > 0 (steps between decays)")
    if not 0.0 < schedule.step_gamma <= 1.0:
        raise ConfigError("schedule.step_gamma must be in (0, 1]")
    if not 0.0 < schedule.plateau_factor < 1.0:
        raise ConfigError("schedule.plateau_factor must be in (0, 1)")
    if schedule.plateau_patience < 1:
        raise ConfigError("schedule.plateau_patience must be at least 1")
    if stopping.patience < 1:
        raise ConfigError("early_stopping.patience must be at least 1")
    if stopping.min_delta < 0:
        raise ConfigError("early_stopping.min_delta must be >= 0")
    watched = stopping.enabled or schedule.name == "plateau"
    if watched and stopping.monitor == "gauc" and not config.data.group_column:
        raise ConfigError("early_stopping.monitor=gauc needs data.group_column (the column GAUC groups by)")


def _validate_sharding(config: Config) -> None:
    sharding = config.sharding
    if sharding.device_memory_gb < 0 or sharding.host_memory_gb < 0:
        raise ConfigError("sharding.device_memory_gb and sharding.host_memory_gb must be >= 0")
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
        if not 0.0 <= entry.cache_load_factor <= 1.0:
            raise ConfigError(f"sharding.tables.{name}.cache_load_factor must be in [0, 1]")
        if entry.min_partition < 0 or entry.min_partition % 4:
            raise ConfigError(f"sharding.tables.{name}.min_partition must be a non-negative multiple of 4")
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
