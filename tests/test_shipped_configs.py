"""Every config in configs/ on the real Criteo samples in ../shared/data (skipped where absent): it runs on
this host or is refused in one line naming the override, a few steps train a sane model, and the config for
small real logs (configs/criteo_small.yaml) reaches val AUC 0.70 on both samples as shipped."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from recsys.config import ConfigError, check_device, load_config
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from recsys.distributed.env import device_type
from recsys.train import MIN_STEPS_PER_EPOCH, short_epoch_advice, train
from tests.helpers import CONFIG_DIR, read_metrics, shared_file

SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def host_overrides(name: str) -> list[str]:
    """The overrides this host needs for a shipped config, taken from the one-line refusals (``use X=Y``)."""
    overrides: list[str] = []
    for _ in range(3):  # one refusal at a time
        config = load_config(CONFIG_DIR / name, overrides)
        try:
            check_device(config, device_type(config.sharding.compute_device))
            return overrides
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1
            overrides.append(re.search(r"use (\S+=\w+)", str(e)).group(1))
    raise AssertionError(f"{name}: still refused with {overrides}")


def test_every_shipped_config_runs_here_or_is_refused_naming_the_override() -> None:
    assert {"criteo_kaggle.yaml", "criteo_small.yaml", "criteo_terabyte.yaml", "synthetic.yaml"} <= set(SHIPPED)
    needed = {name: host_overrides(name) for name in SHIPPED}
    if device_type("auto") == "cpu":
        assert needed["criteo_kaggle.yaml"] == ["optimizer.sparse=adagrad"]  # BARS' Adam: CUDA-only in FBGEMM
        assert needed["criteo_terabyte.yaml"] == ["sharding.compute_device=cpu"]
        assert needed["criteo_small.yaml"] == needed["synthetic.yaml"] == []
    with pytest.raises(ConfigError, match=r"criteo_kaggle.yaml: optimizer.sparse=adam has no FBGEMM CPU kernel: use optimizer.sparse=adagrad"):
        load_config(CONFIG_DIR / "criteo_kaggle.yaml", ["sharding.compute_device=cpu"])  # at load: names the CPU


@pytest.mark.parametrize(
    "rows, batch, world, expected",
    [(1_587, 4096, 1, 64), (1_587, 128, 1, None), (8_000, 32768, 16, 256), (30, 4096, 2, 2), (100_000, 4096, 1, None)],
)
def test_a_short_epoch_names_a_batch_size_that_gives_enough_steps(rows: int, batch: int, world: int, expected: int | None) -> None:
    advice = short_epoch_advice(rows, -(-rows // batch), batch, world)
    if expected is None:
        assert advice is None
        return
    assert advice["suggested_batch_size"] == expected and expected % world == 0
    assert f"use data.batch_size={expected}" in advice["message"] and "configs/criteo_small.yaml" in advice["message"]


def _shards(raw: Path, out: Path) -> Path:
    """``raw`` split 80/10/10 at random as `recsys preprocess` does by default (criteo schema)."""
    run(Settings(out=str(out), inputs=[str(raw)], progress=False, workers=1), load_schema("criteo"))
    return out


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shards(shared_file("criteo", "kaggle_train_sample_1999.tsv"), tmp_path_factory.mktemp("kaggle"))


@pytest.fixture(scope="module")
def terabyte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shards(shared_file("criteo", "terabyte_day0_sample_10000.tsv"), tmp_path_factory.mktemp("terabyte"))


def _data(shards: Path, run_dir: Path) -> list[str]:
    return [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", f"data.test={shards / 'test'}",
            f"training.run_dir={run_dir}", "logging.tensorboard=false", "logging.progress_bar=false"]  # fmt: skip


def _base_rate_logloss(ctr: float) -> float:
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))


@pytest.mark.slow  # trains each shipped config
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_trains_sanely_or_says_what_to_change(
    name: str, kaggle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A few steps on the 1,587 train rows, the config's own batch; the terabyte recipe's 40M-row table
    # sizes give way to the sample's.
    fixed = ["training.epochs=4", "training.max_steps=25", "training.eval_every_steps=0", "model.num_embeddings=0"]
    config = load_config(CONFIG_DIR / name, [*host_overrides(name), *_data(kaggle, tmp_path / "run"), *fixed])
    val = train(config)["val"]
    warnings = read_metrics(tmp_path / "run", "warning")
    if config.data.batch_size * MIN_STEPS_PER_EPOCH > 1_587:  # recipes for large logs: an epoch is a step or two
        (warning,) = warnings
        assert f"use data.batch_size={warning['suggested_batch_size']}" in warning["message"]
        assert f"warning: {warning['message']}" in capsys.readouterr().out
        return
    assert not warnings
    assert val["rows"] > 150 and val["logloss"] < _base_rate_logloss(val["ctr"]), val
    assert read_metrics(tmp_path / "run", "val")[-1]["step"] == 25  # max_steps mid-epoch: validated at its end


@pytest.mark.slow  # the recipe for small real logs, as shipped, to early stopping
@pytest.mark.parametrize("sample", ["kaggle", "terabyte"])
def test_the_small_logs_recipe_learns_both_samples(sample: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    shards = request.getfixturevalue(sample)
    result = train(load_config(CONFIG_DIR / "criteo_small.yaml", _data(shards, tmp_path / "run")))
    assert result["val"]["auc"] >= 0.70, result
    assert not read_metrics(tmp_path / "run", "warning")  # epochs long enough
