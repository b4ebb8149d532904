"""launch/components.py and .torchxconfig, checked without starting a job."""

from __future__ import annotations

import configparser
import subprocess
import sys

import pytest
from torchx.schedulers import get_scheduler_factories
from torchx.specs.builders import materialize_appdef
from torchx.specs.file_linter import validate
from torchx.specs.finder import get_component
from tests.helpers import REPO


COMPONENTS = REPO / "launch" / "components.py"


def component(name: str):
    return get_component(f"{COMPONENTS}:{name}").fn


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_components_pass_the_torchx_linter(name: str) -> None:
    assert validate(str(COMPONENTS), name) == []


def test_train_runs_recsys_under_torchrun_with_restarts_and_rank_prefixed_logs() -> None:
    app = materialize_appdef(
        component("train"),
        ["--nnodes", "2", "--nproc_per_node", "4", "--gpu", "4", "--max_restarts", "2",
         "--env", "NCCL_DEBUG=INFO", "--", "configs/synthetic.yaml", "training.epochs=2"],
    )  # fmt: skip
    (role,) = app.roles
    assert role.name == "train" and role.num_replicas == 2 and role.min_replicas == 2
    assert role.resource.gpu == 4
    assert role.entrypoint == "bash"
    command = role.args[-1]
    assert command.startswith("torchrun ")
    assert "--nnodes 2 --nproc_per_node 4" in command
    assert command.endswith("-m recsys.cli train configs/synthetic.yaml training.epochs=2")
    assert role.env["PET_MAX_RESTARTS"] == "2"  # torchrun's --max-restarts
    assert role.env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]:"
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert role.env["NCCL_DEBUG"] == "INFO"


def test_train_elastic_node_range_and_mounts() -> None:
    app = component("train")(
        "configs/synthetic.yaml", nnodes=4, min_nnodes=2, mounts=["type=bind", "src=/data", "dst=/data"]
    )
    (role,) = app.roles
    assert (role.min_replicas, role.num_replicas) == (2, 4)
    assert "--nnodes 2:4" in role.args[-1]
    assert [(m.src_path, m.dst_path) for m in role.mounts] == [("/data", "/data")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "pass the config"),
        ({"nnodes": 0}, "nnodes and nproc_per_node"),
        ({"nnodes": 2, "min_nnodes": 3}, "min_nnodes"),
        ({"max_restarts": -1}, "max_restarts"),
    ],
)
def test_train_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = () if not kwargs else ("configs/synthetic.yaml",)
    with pytest.raises(ValueError, match=message):
        component("train")(*args, **kwargs)


def test_evaluate_scores_the_chosen_split() -> None:
    (role,) = component("evaluate")("configs/synthetic.yaml", "data.test=x.tsv", split="val").roles
    assert role.args[-1].endswith("-m recsys.cli eval configs/synthetic.yaml data.test=x.tsv --split=val")
    assert role.env["PET_MAX_RESTARTS"] == "0"
    (role,) = component("evaluate")("configs/synthetic.yaml", checkpoint="latest").roles
    assert role.args[-1].endswith("eval configs/synthetic.yaml --split=test --checkpoint=latest")
    with pytest.raises(ValueError, match="split"):
        component("evaluate")("configs/synthetic.yaml", split="train")


def torchx_cli(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_torchx_help_explains_every_argument() -> None:
    out = torchx_cli("run", "launch/components.py:train", "--help")
    for arg in ("--nnodes", "--nproc_per_node", "--image", "--cpu", "--gpu", "--memMB", "--max_restarts",
                "--env", "--mounts"):  # fmt: skip
        assert arg in out
    assert "torchelastic restarts of the whole worker group" in out


def test_slurm_dry_run_writes_a_two_node_batch_script() -> None:
    out = torchx_cli(
        "run", "--dryrun", "-s", "slurm", "launch/components.py:train", "--nnodes", "2", "--nproc_per_node", "8",
        "--gpu", "8", "--", "configs/synthetic.yaml", "training.run_dir=/shared/runs/x",
    )  # fmt: skip
    assert "#SBATCH hetjob" in out  # one Slurm het-group per node
    assert "--gpus-per-task=8" in out
    assert "torchrun --rdzv_backend c10d" in out and "--nnodes 2 --nproc_per_node 8" in out
    assert "PET_MAX_RESTARTS=3" in out


def test_torchxconfig_sets_only_options_the_schedulers_know() -> None:
    parser = configparser.ConfigParser()
    assert parser.read(REPO / ".torchxconfig")
    factories = get_scheduler_factories()
    schedulers = [s for s in parser.sections() if not s.startswith(("cli:", "component:"))]
    assert sorted(schedulers) == ["kubernetes", "local_cwd", "slurm"]
    for name in schedulers:
        known = {key for key, _ in factories[name](session_name="test").run_opts()}
        assert set(parser[name]) <= known, (name, set(parser[name]) - known)
    assert parser["cli:run"]["component"] == "launch/components.py:train"
