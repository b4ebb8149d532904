"""TorchX components: one definition of the recsys jobs for every scheduler.

The same component starts a job on this box (``-s local_cwd``), on Kubernetes (``-s kubernetes``, with the
image built from the ``Dockerfile``) or on Slurm (``-s slurm``)::

    torchx run -s local_cwd launch/components.py:train --nnodes 2 --nproc_per_node 1 -- configs/synthetic.yaml
    torchx run -s kubernetes launch/components.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 \\
        --image registry.example.com/recsys:0.1.0 -- configs/synthetic.yaml training.run_dir=/mnt/runs/x
    torchx run launch/components.py:train --help     # every argument, explained

``train`` is TorchX's ``dist.ddp`` (torchrun under torchelastic) running ``python -m recsys.cli train``.
On top of ``dist.ddp`` it exposes torchelastic's in-place group restarts (``--max_restarts``: a lost
worker costs a restart from the last checkpoint, not the run) and prefixes every log line with the
worker's global rank. ``evaluate`` scores a checkpoint of a run (the best, else the latest) the same way.
"""

# No `from __future__ import annotations`: TorchX reads the parameter types at runtime to parse arguments.

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

DEFAULT_IMAGE = "recsys:latest"
# torchelastic's prefix for every line a worker prints (default: local rank only, ambiguous across nodes).
LOG_LINE_PREFIX = "[rank${rank}]:"


def _recsys(
    command: str,
    config_and_overrides: tuple[str, ...],
    *,
    name: str,
    nnodes: int,
    nproc_per_node: int,
    min_nnodes: int,
    image: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    max_restarts: int,
    max_retries: int,
    env: Optional[Dict[str, str]],
    mounts: Optional[List[str]],
    rdzv_port: int,
) -> specs.AppDef:
    """``recsys <command> CONFIG [OVERRIDES]`` on ``nnodes`` x ``nproc_per_node`` workers via dist.ddp."""
    if not config_and_overrides:
        raise ValueError("pass the config after `--`, e.g. `-- configs/synthetic.yaml training.epochs=2`")
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {nnodes} and {nproc_per_node}")
    if not 0 <= min_nnodes <= nnodes:
        raise ValueError(f"min_nnodes must be in [0, nnodes={nnodes}] (0: same as nnodes), got {min_nnodes}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    nodes = f"{min_nnodes}:{nnodes}" if min_nnodes and min_nnodes != nnodes else str(nnodes)
    job_env = {
        # torchrun reads its options from PET_<OPTION> when they are not on its command line; dist.ddp
        # has no parameter for torchelastic's group restarts.
        "PET_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LOG_LINE_PREFIX,
        # A fresh TCPStore per rendezvous round: with the store shared across rounds (the default), a
        # restarted group reads the previous attempt's keys and fails to connect
        # (https://github.com/pytorch/pytorch/issues/135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    app = dist.ddp(
        command,
        *config_and_overrides,
        m="recsys.cli",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nodes}x{nproc_per_node}",
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    app.roles[0].name = command  # dist.ddp names the role after the module ("cli")
    return app


def train(
    *config_and_overrides: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    min_nnodes: int = 0,
    image: str = DEFAULT_IMAGE,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    max_restarts: int = 3,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
    name: str = "recsys/train",
) -> specs.AppDef:
    """Trains DeepFM with ``recsys train`` on nnodes x nproc_per_node workers (torchrun, gloo or NCCL).

    The run resumes from the latest checkpoint in ``training.run_dir``, so a restarted worker group, a
    resubmitted job or a rerun of the same command continues where the last checkpoint left off. Set
    ``training.checkpoint_every_steps`` to bound the work a failure costs. ``training.run_dir`` must be on
    storage every node sees (a shared filesystem or a mount) when nnodes > 1.

    Args:
        config_and_overrides: the YAML config then section.key=value overrides, after ``--``
            (e.g. ``-- configs/synthetic.yaml training.epochs=2 data.batch_size=8192``)
        nnodes: number of nodes (hosts, or replicas of the role on a local scheduler)
        nproc_per_node: worker processes per node; one per GPU on GPU hosts
        min_nnodes: elastic lower bound on nodes (0: fixed size, exactly nnodes)
        image: container image with recsys installed (built from the Dockerfile); ignored by local_cwd,
            which runs in the current directory's environment
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: host memory per node (replica) in MB
        h: a TorchX named resource (e.g. aws_p4d.24xlarge); overrides cpu, gpu and memMB
        max_restarts: torchelastic restarts of the whole worker group after a worker fails; each
            restart resumes from the latest checkpoint
        max_retries: scheduler-level retries of a failed replica (Kubernetes, Slurm)
        env: extra environment variables for every worker (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=8)
        mounts: mounts for container schedulers, e.g. type=bind,src=/data,dst=/data[,readonly]
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node runs only)
        name: job name, ``{experiment}/{run}``
    """
    return _recsys(
        "train", config_and_overrides, name=name, nnodes=nnodes, nproc_per_node=nproc_per_node,
        min_nnodes=min_nnodes, image=image, cpu=cpu, gpu=gpu, memMB=memMB, h=h, max_restarts=max_restarts,
        max_retries=max_retries, env=env, mounts=mounts, rdzv_port=rdzv_port,
    )  # fmt: skip


def evaluate(
    *config_and_overrides: str,
    split: str = "test",
    checkpoint: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
    name: str = "recsys/eval",
) -> specs.AppDef:
    """Scores a checkpoint of a run (``recsys eval``; the best, else the latest) on the val or test split.

    The checkpoint is resharded on load, so any number of workers can evaluate a run trained on another.

    Args:
        config_and_overrides: the config the run was trained with, then section.key=value overrides,
            after ``--``
        split: val or test
        checkpoint: latest, best or a checkpoint path (default: the best if early stopping marked one,
            else the latest)
        nnodes: number of nodes
        nproc_per_node: worker processes per node
        image: container image with recsys installed; ignored by local_cwd
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: host memory per node (replica) in MB
        h: a TorchX named resource; overrides cpu, gpu and memMB
        env: extra environment variables for every worker
        mounts: mounts for container schedulers, e.g. type=bind,src=/data,dst=/data[,readonly]
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node runs only)
        name: job name, ``{experiment}/{run}``
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be val or test, got {split!r}")
    chosen = (f"--checkpoint={checkpoint}",) if checkpoint else ()
    args = (*config_and_overrides, f"--split={split}", *chosen) if config_and_overrides else ()
    return _recsys(
        "eval", args, name=name, nnodes=nnodes,
        nproc_per_node=nproc_per_node, min_nnodes=0, image=image, cpu=cpu, gpu=gpu, memMB=memMB, h=h,
        max_restarts=0, max_retries=0, env=env, mounts=mounts, rdzv_port=rdzv_port,
    )  # fmt: skip
