"""The ``recsys`` command line: argument parsing, ``section.key=value`` overrides reaching the run, exit
statuses. Errors a user causes end with exit status 2 and one line naming the file or key; --debug shows
the traceback; a bug keeps its traceback."""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import recsys.checkpoint
import recsys.train
from recsys.cli import main
from recsys.config import Config, ConfigError
from recsys.distributed.elastic import TrainingStopped
from tests.helpers import REPO, child_env, tiny_config


@pytest.fixture(scope="module")
def config_file(tiny_criteo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_criteo, root / "run", 32, 1)))
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


# --- argument parsing: argparse's usage errors exit 2 before anything runs


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["fit", "c.yaml"], "invalid choice: 'fit'"),
        (["train"], "the following arguments are required: config"),
        (["train", "c.yaml", "--resume"], "unrecognized arguments: --resume"),
        (["eval", "c.yaml", "--split", "train"], "argument --split: invalid choice: 'train'"),
        (["export", "c.yaml", "--quantize", "int2"], "argument --quantize: invalid choice: 'int2'"),
        (["plan", "c.yaml"], "the following arguments are required: --world-size"),
        (["plan", "c.yaml", "--world-size", "two"], "argument --world-size: invalid int value: 'two'"),
        (["plan", "c.yaml", "--world-size", "0"], "argument --world-size: 0 must be >= 1"),
        (["plan", "c.yaml", "--world-size", "-2"], "argument --world-size: -2 must be >= 1"),
        (["plan", "c.yaml", "--world-size", "2", "--local-world-size", "-1"], "argument --local-world-size: -1 must be >= 0"),
        (["plan", "c.yaml", "--world-size", "2", "--device-memory-gb", "-1"], "argument --device-memory-gb: -1 must be >= 0"),
        (["generate", "--rows", "1e3"], "argument --rows: invalid int value: '1e3'"),
        (["predict", "export_dir", "in.tsv"], "the following arguments are required: --output"),
    ],
)
def test_usage_errors_exit_2_with_argparse_message(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: recsys") and message in err, err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["plan", "--help"]])
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: recsys")


# --- overrides: parsed as YAML into the config the command runs with


@pytest.fixture
def trained_configs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, bool]]:
    """Stands in for training: records (config, verify) of every `recsys train` and returns at once."""
    calls: list[tuple[Config, bool]] = []
    monkeypatch.setattr(recsys.train, "train", lambda config, verify=False: calls.append((config, verify)) or {})
    return calls


def test_overrides_reach_the_run(config_file: Path, trained_configs: list) -> None:
    argv = ["train", str(config_file), "training.epochs=3", "model.deep_layers=[8, 4]", "optimizer.sparse_lr=2e-3",
            "data.shuffle=false", "--verify"]  # fmt: skip
    assert main(argv) == 0
    ((config, verify),) = trained_configs
    assert verify is True
    assert config.training.epochs == 3 and config.model.deep_layers == [8, 4]
    assert config.optimizer.sparse_lr == 2e-3 and config.data.shuffle is False
    assert config.data.batch_size == 32  # from the file


def test_later_override_of_a_key_wins(config_file: Path, trained_configs: list) -> None:
    assert main(["train", str(config_file), "training.epochs=3", "training.epochs=5"]) == 0
    assert trained_configs[0][0].training.epochs == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.embeding_dim=8",
         r"unknown key\(s\) \['embeding_dim'\] in section 'model'; valid keys: \[.*'embedding_dim'"),
        ("modle.embedding_dim=8", r"unknown key\(s\) \['modle'\] in the top level; valid keys: \['data', 'model'"),
        ("training.epochs=two", "training.epochs: expected an integer"),
        ("training.epochs", "section.key=value"),
        ("optimizer.sparse=adadelta", "optimizer.sparse: 'adadelta' is not one of"),
    ],
)  # fmt: skip
def test_bad_override_is_one_line_naming_the_key(
    config_file: Path, trained_configs: list, override: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    line = _fails(capsys, "train", str(config_file), override)
    assert line.startswith("recsys train: error: "), line
    assert re.search(message, line), line
    assert not trained_configs  # nothing ran


def test_eval_prints_metrics_as_json_with_split_and_checkpoint(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = []

    def evaluate(config: Config, split: str, checkpoint: str | None) -> dict:
        seen.append((config.data.eval_batch_size, split, checkpoint))
        return {"auc": 0.75, "rows": 10}

    monkeypatch.setattr(recsys.train, "evaluate_checkpoint", evaluate)
    assert main(["eval", str(config_file), "data.eval_batch_size=64", "--split", "val", "--checkpoint", "best"]) == 0
    assert seen == [(64, "val", "best")]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"auc": 0.75, "rows": 10}


# --- exit statuses of a run


def test_training_stopped_by_a_signal_exits_128_plus_signal(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def stopped(config: Config, verify: bool = False) -> dict:
        raise TrainingStopped(signal.SIGTERM, 7, "runs/x/checkpoints/step_00000007")

    monkeypatch.setattr(recsys.train, "train", stopped)
    assert main(["train", str(config_file)]) == 128 + signal.SIGTERM
    assert "recsys: stopped by SIGTERM after step 7; checkpoint runs/x/checkpoints/step_00000007" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(config: Config, verify: bool = False) -> dict:
        raise KeyError("not a user error")

    monkeypatch.setattr(recsys.train, "train", broken)
    with pytest.raises(KeyError, match="not a user error"):
        main(["train", str(config_file)])


@pytest.mark.slow  # a child process
def test_the_shell_sees_the_exit_status(tmp_path: Path) -> None:
    """``python -m recsys`` as a user runs it: a config error is status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "recsys", "train", str(tmp_path / "missing.yaml")], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("recsys train: error: ")
    assert "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_are_taken_anywhere_after_the_config(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = []
    monkeypatch.setattr(recsys.train, "evaluate_checkpoint",
                        lambda config, split, checkpoint: seen.append((config.data.eval_batch_size, split)) or {})
    assert main(["eval", str(config_file), "--split", "val", "data.eval_batch_size=8192"]) == 0
    assert seen == [(8192, "val")]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(config_file), "--split", "val", "--bogus", "data.eval_batch_size=8"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# --- files in, files out: generated data, storage errors


@pytest.mark.parametrize("rows", ["0", "-5", "5"])
def test_generate_refuses_rows_that_leave_a_split_empty(rows: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _fails(capsys, "generate", "--rows", rows, "--out", str(tmp_path / "data"))
    assert f"--rows {rows} leaves a split without rows" in line and "at least 10" in line
    assert not (tmp_path / "data").exists()


def test_generate_on_a_full_disk_leaves_no_split(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.data.synthetic as synthetic

    real, calls = synthetic.format_rows, []

    def full(chunk: dict) -> str:
        calls.append(1)
        if len(calls) == 2:  # the val split
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(chunk)

    monkeypatch.setattr(synthetic, "format_rows", full)
    line = _fails(capsys, "generate", "--rows", "100", "--out", str(tmp_path))
    assert line.endswith(f"{tmp_path / 'val.tsv'}: No space left on device: free space there or choose another path")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not train.tsv alone, no .tmp


def test_storage_errors_get_the_hint_that_fits() -> None:
    from recsys.cli import _user_message

    assert _user_message(OSError(errno.ENOSPC, "No space left on device", "/d/x")) == (
        "/d/x: No space left on device: free space there or choose another path")
    assert _user_message(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == (
        "/ro/x: Read-only file system: choose a writable path")
