"""Schemas of delimited click logs: which column is the label, which are dense, which are sparse.

A schema is a small YAML file (``configs/schemas/*.yaml``) read into :class:`Schema`. It also carries the
dataset's default transforms, which ``recsys preprocess`` flags can override. Files are checked like run
configs: unknown keys fail listing the valid ones, and cross-field mistakes (a feature that is not a column,
a column used twice) fail naming the feature.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from recsys.config import ConfigError, build_dataclass, read_yaml

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "configs" / "schemas"

# How a sparse token is read: Criteo's 8-hex ids, decimal integers, or any string.
SPARSE_KINDS = ("hex", "int", "string")
DENSE_TRANSFORMS = ("log1p", "none")
SPARSE_MODES = ("vocab", "hash")


@dataclass
class Schema:
    """Layout of one delimited log format plus its default transforms.

    ``columns`` names every column in file order; it is required when the file has no header and, when it
    has one, must match the header. Columns that are neither label, dense nor sparse are ignored (e.g. a
    row id). ``multi_hot`` maps a sparse feature to the separator between its values within a field.
    ``id_column`` names a row-id column that training ignores and ``recsys predict`` copies next to each
    score. ``label`` is empty only in the copy ``recsys.serving`` makes for unlabelled input.
    ``group`` names a column (a user id, say; it may also be a sparse feature) whose raw ids are kept per
    row in ``groups.npy`` for GAUC; ``kinds`` may give its kind. ``quote``: the RFC 4180 quote character
    (a quoted field may hold the delimiter, newlines and doubled quotes), ``'"'`` by default for comma-separated
    files, none (``""``) otherwise.
    """

    name: str
    delimiter: str
    header: bool
    label: str
    columns: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)
    sparse_kind: str = "string"
    kinds: dict[str, str] = field(default_factory=dict)
    multi_hot: dict[str, str] = field(default_factory=dict)
    dense_transform: str = "log1p"
    sparse_mode: str = "vocab"
    min_count: int = 1
    hash_buckets: Union[int, dict[str, int]] = 1_000_000
    id_column: str = ""
    group: str = ""
    quote: Optional[str] = None

    def __post_init__(self) -> None:
        if self.quote is None:
            self.quote = '"' if self.delimiter == "," else ""

    @property
    def one_hot(self) -> list[str]:
        """The sparse features with one id per row (the columns of ``sparse.npy``), in schema order."""
        return [name for name in self.sparse if name not in self.multi_hot]

    @property
    def id_columns(self) -> list[str]:
        """Columns parsed as ids: the sparse features, then the group column if it is not one of them."""
        return self.sparse + ([self.group] if self.group and self.group not in self.sparse else [])

    def used_columns(self) -> list[str]:
        """What parsing reads: the label (when set), dense columns and id columns."""
        return ([self.label] if self.label else []) + [*self.dense, *self.id_columns]

    def kind(self, feature: str) -> str:
        return self.kinds.get(feature, self.sparse_kind)

    def buckets(self, feature: str) -> int:
        return self.hash_buckets if isinstance(self.hash_buckets, int) else self.hash_buckets[feature]

    def validate(self) -> None:
        if len(self.delimiter) != 1:
            raise ConfigError(f"schema {self.name}: delimiter must be one character, got {self.delimiter!r}")
        if len(self.quote) > 1 or self.quote in (self.delimiter, "\n"):
            raise ConfigError(f"schema {self.name}: quote must be one character other than the delimiter, or empty")
        if not self.header and not self.columns:
            raise ConfigError(f"schema {self.name}: a file without header needs 'columns'")
        if len(set(self.columns)) != len(self.columns):
            raise ConfigError(f"schema {self.name}: duplicate names in 'columns'")
        if not self.sparse:
            raise ConfigError(f"schema {self.name}: needs at least one sparse feature")
        used = [self.label, *self.dense, *self.id_columns]
        seen: set[str] = set()
        for name in used:
            if name in seen:
                raise ConfigError(f"schema {self.name}: column {name!r} is used more than once")
            seen.add(name)
            if self.columns and name not in self.columns:
                raise ConfigError(f"schema {self.name}: {name!r} is not one of its columns {self.columns}")
        if self.id_column and (self.id_column in seen or (self.columns and self.id_column not in self.columns)):
            raise ConfigError(f"schema {self.name}: id_column {self.id_column!r} must be a column that is not "
                              "the label or a feature")
        for name in self.kinds:
            if name not in self.id_columns:
                raise ConfigError(f"schema {self.name}: kinds.{name}: neither a sparse feature nor the group column")
        for name in self.multi_hot:
            if name not in self.sparse:
                raise ConfigError(f"schema {self.name}: multi_hot.{name}: not a sparse feature")
        if self.group in self.multi_hot:
            raise ConfigError(f"schema {self.name}: the group column {self.group!r} cannot be multi-hot")
        for name in self.id_columns:
            if self.kind(name) not in SPARSE_KINDS:
                raise ConfigError(f"schema {self.name}: kind of {name!r} must be one of {list(SPARSE_KINDS)}")
        for name, sep in self.multi_hot.items():
            if len(sep) != 1 or sep == self.delimiter:
                raise ConfigError(f"schema {self.name}: multi_hot.{name}: separator must be one character "
                                  "other than the delimiter")
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise ConfigError(f"schema {self.name}: dense_transform must be one of {list(DENSE_TRANSFORMS)}")
        if self.sparse_mode not in SPARSE_MODES:
            raise ConfigError(f"schema {self.name}: sparse_mode must be one of {list(SPARSE_MODES)}")
        if self.min_count < 1:
            raise ConfigError(f"schema {self.name}: min_count must be >= 1")
        if isinstance(self.hash_buckets, dict):
            missing = [f for f in self.sparse if f not in self.hash_buckets]
            if missing:
                raise ConfigError(f"schema {self.name}: hash_buckets has no entry for {missing}")
        sizes = [self.buckets(f) for f in self.sparse]
        if any(not 0 < n < 2**31 for n in sizes):
            raise ConfigError(f"schema {self.name}: hash_buckets must be in [1, 2**31)")

    def to_dict(self) -> dict:
        return asdict(self)


def schema_from_dict(values: dict, overrides: dict | None = None) -> Schema:
    """Builds and validates a Schema; ``overrides`` (same keys) win over ``values``."""
    values = {**(values or {}), **(overrides or {})}
    required = [f.name for f in fields(Schema) if f.default is f.default_factory is MISSING]
    absent = [name for name in required if name not in values]
    if absent:
        raise ConfigError(f"schema: missing required key(s) {absent}")
    schema = build_dataclass(Schema, values, "schema")
    schema.validate()
    return schema


def load_schema(name_or_path: str | Path, overrides: dict | None = None) -> Schema:
    """Loads ``configs/schemas/<name>.yaml`` for a bare name (``criteo``), else the given YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = SCHEMA_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SCHEMA_DIR.glob("*.yaml"))
        raise ConfigError(f"schema not found: {name_or_path} (shipped schemas: {shipped})")
    values = read_yaml(path, "schema")
    try:
        return schema_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
