from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recsys.config import ConfigError, config_from_dict, load_config, parse_overrides
from tests.helpers import CONFIG_DIR

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _assert_holds(loaded: object, written: object, key: str) -> None:
    """Every value the YAML wrote is the value the loaded config holds (a dataclass field, a mapping entry or
    a list item), recursively."""
    if isinstance(written, dict):
        for name, value in written.items():
            inner = loaded.get(name, _MISSING) if isinstance(loaded, dict) else getattr(loaded, name, _MISSING)
            assert inner is not _MISSING, f"{key}.{name} was written but not loaded"
            _assert_holds(inner, value, f"{key}.{name}")
    elif isinstance(written, list) and isinstance(loaded, (list, tuple)):
        assert len(loaded) == len(written), key
        for i, (inner, value) in enumerate(zip(loaded, written)):
            _assert_holds(inner, value, f"{key}[{i}]")
    else:
        assert loaded == written, f"{key}: the file says {written!r}, the loaded config holds {loaded!r}"


_MISSING = object()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_with_its_values(path: Path) -> None:
    written = yaml.safe_load(path.read_text())
    assert written, f"{path} is empty"
    _assert_holds(load_config(path), written, path.stem)


def test_shipped_configs_exist() -> None:
    assert any(p.name == "synthetic.yaml" for p in CONFIGS)


def test_overrides_are_parsed_as_yaml_and_applied() -> None:
    config = config_from_dict({}, ["training.epochs=3", "model.deep_layers=[64, 32]", "optimizer.sparse_lr=0.1"])
    assert config.training.epochs == 3
    assert config.model.deep_layers == [64, 32]
    assert config.optimizer.sparse_lr == 0.1


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['embeding_dim'\].*valid keys: \[.*'embedding_dim'"):
        config_from_dict({"model": {"embeding_dim": 8}})


def test_unknown_section_lists_sections() -> None:
    with pytest.raises(ConfigError, match=r"\['modle'\] in the top level; valid keys: \['data', 'model'"):
        config_from_dict({"modle": {}})


def test_unknown_override_key_fails() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({}, ["training.epoch=2"])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"training": {"epochs": "two"}}, "training.epochs: expected an integer"),
        ({"training": {"epochs": 1.5}}, "training.epochs: expected an integer"),
        ({"model": {"deep_layers": [64, "x"]}}, r"model.deep_layers\[1\]: expected an integer"),
        ({"data": {"shuffle": "yes"}}, "data.shuffle: expected true/false"),
        ({"model": "big"}, "model: expected a mapping"),
        ({"optimizer": {"sparse": "adadelta"}}, "optimizer.sparse: 'adadelta' is not one of"),
        ({"data": {"sparse_features": ["C1"]}, "model": {"num_embeddings": [10, 20]}}, "model.num_embeddings has 2 entries"),
        ({"data": {"sparse_features": ["C1", "C2"]}, "model": {"shared_tables": {"t": ["C1", "X9"]}}}, "unknown sparse feature 'X9'"),
        ({"loss": {"name": "hinge"}}, r"loss.name: 'hinge' is not one of \['bce', 'focal'\]"),
        ({"loss": {"pos_weight": 0}}, r"loss.pos_weight=0.0: must be > 0"),
        ({"loss": {"focal_alpha": 2}}, r"loss.focal_alpha=2.0: must be <= 1"),
        ({"data": {"negative_downsampling": 0}}, r"data.negative_downsampling=0.0: must be in \(0, 1\]"),
        ({"early_stopping": {"monitor": "ne"}}, "early_stopping.monitor: 'ne' is not one of"),
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience=0: must be >= 1"),
        ({"early_stopping": {"enabled": True, "monitor": "gauc"}}, "monitor=gauc needs data.group_column"),
    ],
)
def test_wrong_values_fail_with_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_int_accepted_where_float_expected() -> None:
    assert config_from_dict({"optimizer": {"dense_lr": 1}}).optimizer.dense_lr == 1.0


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["training.epochs"])


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_exponent_without_dot_is_a_number() -> None:
    config = config_from_dict({}, ["optimizer.sparse_eps=1e-6", "optimizer.sparse_lr=2E-3"])
    assert config.optimizer.sparse_eps == 1e-6 and config.optimizer.sparse_lr == 2e-3
    with pytest.raises(ConfigError, match="optimizer.sparse_lr"):
        config_from_dict({}, ["optimizer.sparse_lr=fast"])


# The hostile values (each trained or crashed before: sparse_lr=-1 to logloss 376,594, epochs=0 reported an
# untrained model, deep_layers=[0] built an empty layer, negative intervals meant something else) and one of every
# other kind of declared range.
@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.sparse_lr=-1", r"optimizer.sparse_lr=-1.0: must be > 0"),
        ("optimizer.dense_lr=-1", r"optimizer.dense_lr=-1.0: must be > 0"),
        ("optimizer.dense_lr=0", r"optimizer.dense_lr=0.0: must be > 0"),
        ("training.epochs=0", r"training.epochs=0: must be >= 1"),
        ("model.deep_layers=[]", r"model.deep_layers: \[\] is empty; give at least one entry, each >= 1"),
        ("model.deep_layers=[-3]", r"model.deep_layers\[0\]=-3 in \[-3\]: each entry must be >= 1"),
        ("model.deep_layers=[64,0]", r"model.deep_layers\[1\]=0 in \[64, 0\]: each entry must be >= 1"),
        ("model.embedding_dim=0", r"model.embedding_dim=0: must be >= 1"),
        ("training.eval_every_steps=-5", r"training.eval_every_steps=-5: must be >= 0 \(0 = off\)"),
        ("training.checkpoint_every_steps=-1", r"training.checkpoint_every_steps=-1: must be >= 0 \(0 = off\)"),
        ("training.max_steps=0", r"training.max_steps=0: must be >= 1 \(null = no limit"),
        ("training.max_steps=-1", r"training.max_steps=-1: must be >= 1"),
        ("training.nonfinite_patience=0", r"training.nonfinite_patience=0: must be >= 1"),
        ("training.seed=-1", r"training.seed=-1: must be >= 0"),
        ("data.batch_size=0", r"data.batch_size=0: must be >= 1"),
        ("model.dropout=1", r"model.dropout=1.0: must be in \[0, 1\)"),
        ("optimizer.sparse_lr=.nan", r"optimizer.sparse_lr=nan: must be > 0"),
        ("optimizer.dense_lr=.inf", r"optimizer.dense_lr=inf: must be > 0"),
        ("schedule.step_gamma=0", r"schedule.step_gamma=0.0: must be in \(0, 1\]"),
        ("sharding.device_memory_gb=-1", r"sharding.device_memory_gb=-1.0: must be >= 0 \(0 = the device's own size\)"),
        ("sharding.tables={C1: {cache_load_factor: 2}}", r"sharding.tables.C1.cache_load_factor=2.0: must be in \[0, 1\]"),
        ("logging.log_every_steps=-1", r"logging.log_every_steps=-1: must be >= 0 \(0 = at epoch ends only\)"),
    ],
)
def test_out_of_range_values_fail_naming_the_key_and_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


def test_max_steps_null_means_no_limit() -> None:
    assert config_from_dict({}, ["training.max_steps=null"]).training.max_steps is None
    assert config_from_dict({}, ["training.max_steps=7"]).training.max_steps == 7


@pytest.mark.parametrize(
    "content, holds",
    [(b"- a\n- b\n", "a YAML list"), (b"42\n", "a YAML scalar"), (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8 text")],
    ids=["list", "scalar", "binary"],
)
def test_a_config_file_that_is_not_a_mapping_is_refused_naming_it(tmp_path: Path, content: bytes, holds: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{path}: not a config file: .*{holds}"):
        load_config(path)
