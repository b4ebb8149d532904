"""Errors a user causes end with exit status 2 and one line naming the file or key; --debug shows the traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import recsys.checkpoint
from recsys.cli import main
from recsys.config import ConfigError
from tests.distributed.conftest import hashed_shards, tiny_config


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recsys.data.synthetic import generate_splits

    root = tmp_path_factory.mktemp("cli")
    generate_splits(root, 600)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(hashed_shards(root, "shards", 40), root / "run", 32, 1)))
    return path


def _fails(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_override_not_yaml(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    line = _fails(capsys, "train", str(config_file), "training.run_dir=[1")
    assert line.startswith("recsys train: error: ") and "override 'training.run_dir=[1': the value is not valid YAML" in line
    with pytest.raises(ConfigError):  # --debug: the exception itself
        main(["--debug", "train", str(config_file), "training.run_dir=[1"])


def test_folder_as_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _fails(capsys, "preprocess", "--out", str(tmp_path / "out"), str(tmp_path))
    assert f"{tmp_path}: a folder, not an input file" in line
    assert f"{tmp_path} is a folder, not a config file" in _fails(capsys, "train", str(tmp_path))


@pytest.mark.parametrize("command", ["eval", "export"])
def test_no_checkpoint(config_file: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture) -> None:
    line = _fails(capsys, command, str(config_file), f"training.run_dir={tmp_path / 'run'}")
    assert f"no checkpoint in {tmp_path / 'run' / 'checkpoints'}: train first" in line


def test_run_dir_under_a_file(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    line = _fails(capsys, "train", str(config_file), f"training.run_dir={tmp_path / 'file' / 'run'}")
    assert f"training.run_dir={tmp_path / 'file' / 'run'}: cannot create it" in line


def test_disk_full_names_the_checkpoint(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError("104000 requested and 37872 written")  # what torch's writer says on a full disk

    monkeypatch.setattr(recsys.checkpoint.dcp, "save", full)
    line = _fails(capsys, "train", str(config_file), f"training.run_dir={tmp_path / 'run'}")
    assert f"writing checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000001'}.tmp failed" in line
    assert "104000 requested and 37872 written" in line and "is the disk full?" in line
