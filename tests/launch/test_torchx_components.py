"""launch/components.py and .torchxconfig, checked without starting a job."""

from __future__ import annotations

import configparser
import subprocess
import sys

import pytest
import yaml
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


def torchx_cli(*args: str, stdout_only: bool = False) -> str:
    """What ``torchx ARGS`` printed (stdout only: without torchx's log lines, which go to stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def test_torchx_help_explains_every_argument() -> None:
    out = torchx_cli("run", "launch/components.py:train", "--help")
    for arg in ("--nnodes", "--nproc_per_node", "--image", "--cpu", "--gpu", "--memMB", "--max_restarts",
                "--env", "--mounts"):  # fmt: skip
        assert arg in out
    assert "torchelastic restarts of the whole worker group" in out


def scheduler_request(out: str) -> str:
    """What ``torchx run --dryrun`` would submit: the text after its ``=== SCHEDULER REQUEST ===`` line."""
    assert "=== SCHEDULER REQUEST ===" in out, out
    return out.split("=== SCHEDULER REQUEST ===", 1)[1]


TRAIN_COMMAND = "-m recsys.cli train configs/synthetic.yaml training.run_dir="


def test_kubernetes_dry_run_is_the_volcano_job_docs_launch_describes() -> None:
    """docs/launch.md's Kubernetes job, without a cluster; needs the `k8s` extra (the kubernetes client)."""
    pytest.importorskip("kubernetes", reason="the k8s extra: RECSYS_EXTRAS=test,k8s bash tools/install.sh")
    out = torchx_cli(
        "run", "--dryrun", "-s", "kubernetes", "--workspace", "", "launch/components.py:train",
        "--image", "registry.example.com/recsys:0.1.0", "--nnodes", "4", "--nproc_per_node", "8", "--gpu", "8",
        "--cpu", "64", "--memMB", "500000", "--mounts", "type=volume,src=criteo-pvc,dst=/mnt/criteo",
        "--max_restarts", "3", "--", "configs/synthetic.yaml", "training.run_dir=/mnt/criteo/runs/deepfm",
        stdout_only=True,
    )  # fmt: skip
    job = yaml.safe_load(scheduler_request(out))
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["spec"]["queue"] == "default" and job["spec"]["schedulerName"] == "volcano"  # .torchxconfig
    tasks = job["spec"]["tasks"]
    assert [(task["name"], task["replicas"]) for task in tasks] == [(f"train-{i}", 1) for i in range(4)]
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.com/recsys:0.1.0"
        command = " ".join(container["command"])
        assert command.startswith("bash -c torchrun ") and "--nnodes 4 --nproc_per_node 8" in command
        assert command.endswith(TRAIN_COMMAND + "/mnt/criteo/runs/deepfm")
        limits = container["resources"]["limits"]
        assert (limits["cpu"], limits["memory"], limits["nvidia.com/gpu"]) == ("64000m", "500000M", "8")
        assert {"mountPath": "/mnt/criteo", "name": "mount-0", "readOnly": False} in container["volumeMounts"]
        assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "criteo-pvc"}} in task["template"]["spec"]["volumes"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["PET_MAX_RESTARTS"] == "3" and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_slurm_dry_run_is_the_batch_script_docs_launch_describes() -> None:
    """docs/launch.md's Slurm job: one het-group per node, each running torchrun in the submitting directory."""
    out = torchx_cli(
        "run", "--dryrun", "-s", "slurm", "launch/components.py:train", "--nnodes", "4", "--nproc_per_node", "8",
        "--gpu", "8", "--", "configs/synthetic.yaml", "training.run_dir=/shared/runs/deepfm",
    )  # fmt: skip
    script = scheduler_request(out)
    groups = [line for line in script.splitlines() if line.startswith("#SBATCH --job-name=")]
    assert [line.split()[1] for line in groups] == [f"--job-name=train-{i}" for i in range(4)]
    assert script.count("#SBATCH hetjob") == 3
    for line in groups:
        assert "--ntasks-per-node=1" in line and "--gpus-per-task=8" in line and "--time=1-00:00:00" in line
    assert script.count("bash -c 'torchrun --rdzv_backend c10d") == 4
    assert script.count("--nnodes 4 --nproc_per_node 8") == 4
    assert script.count(TRAIN_COMMAND + "/shared/runs/deepfm'") == 4
    assert "PET_MAX_RESTARTS=3" in script
    assert "--container-image" not in script  # the job runs in the submitting environment (docs/launch.md)


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
