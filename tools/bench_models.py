"""Every recsys model and its peers on the same generated rows: ``python tools/bench.py --models``.

    flock /tmp/bench.lock python tools/bench.py --models [--rows 500000] [--threads 2] [--regimes tiny,small,kaggle]

For each table regime (``tiny``: the 26 Criteo-Kaggle cardinalities capped at 4,600 rows, about 64k rows in all;
``small``: capped at 40k; ``kaggle``: the cardinalities themselves, 33.8M rows), each contender trains one
epoch over the train split in a fresh process with ``--threads`` intra-op threads and is evaluated on the test
split:

* ``recsys_<model>``: every model of ``recsys.models.registry.MODELS`` through ``recsys train`` /
  ``recsys eval`` (``configs/synthetic.yaml``'s recipe: dims, MLP, dropout, optimizers, ``mlp_precision
  auto``), with each model's keys of ``MODEL_KEYS`` (its dims and where its recipe differs from DeepFM's);
* ``plain``: tools/bench.py's plain-PyTorch DeepFM (Kaggle-sized tables: ``--slow-steps`` steps only);
* ``torchrec_dlrm_dcn``: TorchRec's own ``DLRM_DCN`` trained as TorchRec's DLRM example trains it:
  DistributedModelParallel with TorchRec's default planner and sharders, fused Adagrad applied in backward
  for the tables, ``TrainPipelineSparseDist``, dense Adagrad; same rows (recsys's loader), dims, batch,
  threads and table optimizer settings as ``recsys_dlrm_dcnv2``.

Timing, the same rule for every contender: train samples/s over the epoch's steps after the first
``bench.WARMUP_STEPS`` (20: recsys's first logged window; in the plain and TorchRec loops the clock read
after step 20), so one-off costs (first allocations, oneDNN's kernel choice, the pipeline filling, a first
step of 2.5 s once in the plain loop) do not count; ``train_samples_per_s_all_steps`` counts every step.
The contenders of the speed ratios (``TIMED``) train ``--repeats`` times (default 3) in interleaved rounds,
every other one in reverse order, and report the median rate (each run's is listed). Why: on this 2-core VM
one contender's rate moved by up to a third between runs of the same code, with other users' processes
taking about a core at times (``other_cores``) and the hypervisor up to 25% of the cores (``steal_pct``, from
/proc/stat), both reported per run.

Prints one JSON line per contender and regime (train/eval samples/s, peak RSS of the process tree, test
AUC, the load beside it) and a summary line per regime with the ratios the issue's targets name.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import KAGGLE_CARDINALITIES, REGIMES, measure_process, model_shape, preprocess, run_in_worker, run_recsys, steady_rate, with_measures

from recsys.models.registry import MODELS

TINY_TABLE_ROWS = 4_600
MODEL_REGIMES = {"tiny": [min(n, TINY_TABLE_ROWS) for n in KAGGLE_CARDINALITIES], **REGIMES}
# Fields of 16 columns; the bottom MLPs [64] -> 16. The cross networks are low-rank: DCNv2's over its 39
# fields as BARS's DCNv2 (3 layers of rank 32), DLRM-DCNv2's over 27 fields 3 layers of rank 16. TorchRec's
# DLRM_DCN takes recsys's DLRM-DCNv2 recipe's dims.
BOTTOM_LAYERS = [64]
CROSS_LAYERS, DCNV2_LOW_RANK, DLRM_DCNV2_LOW_RANK = 3, 32, 16
# Each model's recipe: configs/synthetic.yaml (tuned for DeepFM) with these keys, chosen on the val AUC of the
# tiny regime at 600k rows (test AUCs quoted). The table optimizer's eps 1e-3 there damps the first updates
# of rare ids, which suits DeepFM's first-order weights; the models without them train better with FBGEMM's,
# TorchRec's and recsys's default 1e-8 (DLRM-DCNv2 +0.0037, DCNv2 +0.0022, DLRM +0.0043), and better still
# between the two at 1e-5 (below). Through a dot or cross interaction the MLPs learn slower than DeepFM's:
# the DLRM family takes Adam at 3e-3 (+0.0005, +0.0006; 5e-3 and 1e-2 were worse), within Adam's usual
# range for Criteo. DLRM, as TorchRec's and
# facebookresearch's, has no dropout (+0.0013); its tables start at std 0.05 (+0.0014: the gradient of a
# dot is the other vector, so at 0.01 the dots barely move at first) and, at eps 1e-8, took smaller first
# steps (sparse_lr 0.03: +0.0013 over 0.05).
# Then on val AUC at 500k rows, tiny / small tables: DLRM-DCNv2's cross net of rank 16 (+0.0011 / +0.0012
# over 64; 32 +0.0009 / +0.0004, 8 +0.0008, 128 -0.0031, 256 -0.0043; with the top MLP [128, 64] -0.0005,
# 2 cross layers -0.0002, D 32 -0.0004, bottom [128, 64] -0.0007, dropout 0 -0.0001); DCNv2 as BARS sets
# it, rank 32 and dropout 0.1 (+0.0001 / +0.0002 over rank 64 and dropout 0.2; full rank -0.0005, stacked
# +0.0001 on val but -0.0007 on test, Adam 3e-3 -0.0002, D 32 0.0000). Nothing raised DLRM's: D 32
# -0.0008, top MLP [512, 256] -0.0018 and [128, 64] +0.0001 / -0.0003, bottom [128] -0.0026, tables at std 0.1
# -0.0017, dense weight decay 1e-6 -0.0001, facebookresearch's self-dots in the interaction -0.0008; the
# recipe's 2 epochs with early stopping kept the first epoch for every model (the second over-fits).
# Then on val AUC at 1M rows, tiny tables (the bench's own rows: test AUCs not quoted), each choice checked
# on val at 600k rows, tiny and small tables: the dense rate warmed up over 20 steps and decayed linearly
# to 0 at the epoch's end, as MLPerf's DLRM-DCNv2 recipe warms up and decays (DLRM-DCNv2 +0.0009, DCNv2
# +0.0007, DLRM +0.0003 decay alone; decaying the tables' Adagrad too cost 0.0014-0.0024: its steps shrink
# on their own; cosine below linear); then the tables' eps 1e-5: Adagrad's first step on an id is about
# sparse_lr * g / (|g| + eps), a full step at 1e-8 whatever the gradient, so 1e-5 damps the ids of tiny
# gradients and leaves the rest (DCNv2 +0.0010 / +0.0009 at 600k, DLRM-DCNv2 +0.0007, DLRM +0.0007; 1e-5
# to 3e-5 alike, 1e-6 and 1e-4 below). DLRM then takes Adam at 5e-3 (+0.0003) and sparse_lr back at 0.05
# (0.03 had helped at eps 1e-8; now 0.05 is +0.0004 / +0.0003 at 600k, -0.0002 at 1M); row-wise Adagrad,
# D 24 / 32, tables at std 0.03 / 0.1, top MLP [512, 256] / [128, 64], batch norm, dropout 0.1 and a
# 50-step warm-up gained nothing. DLRM-DCNv2: sparse_lr 0.08 (+0.0003, +0.0002 / +0.0002 at 600k).
# What the models without DeepFM's first-order weights share: the tables' eps, the dense rate's warm-up and decay.
WITHOUT_FIRST_ORDER = ["optimizer.sparse_eps=1e-5", "schedule.name=linear", "schedule.apply_to=[dense]",
                       "schedule.warmup_steps=20"]
MODEL_KEYS = {
    "deepfm": [],
    "dlrm": [f"model.dlrm.bottom_layers={BOTTOM_LAYERS}", *WITHOUT_FIRST_ORDER, "optimizer.dense_lr=5e-3",
             "model.dropout=0", "model.embedding_init_std=0.05"],
    "dcnv2": [f"model.dcnv2.cross_layers={CROSS_LAYERS}", f"model.dcnv2.low_rank={DCNV2_LOW_RANK}",
              *WITHOUT_FIRST_ORDER, "model.dropout=0.1"],
    "dlrm_dcnv2": [f"model.dlrm_dcnv2.bottom_layers={BOTTOM_LAYERS}", f"model.dlrm_dcnv2.cross_layers={CROSS_LAYERS}",
                   f"model.dlrm_dcnv2.low_rank={DLRM_DCNV2_LOW_RANK}", *WITHOUT_FIRST_ORDER,
                   "optimizer.dense_lr=3e-3", "optimizer.sparse_lr=0.08"],
}  # fmt: skip
# Dense Adagrad's rate for TorchRec's loop (the example takes --learning_rate per run): Adagrad's steps shrink
# as squared gradients accumulate, so it needs a larger rate than Adam.
TORCHREC_DENSE_LR = 0.01
# One epoch each (the plain and TorchRec loops train one), no early stopping.
COMMON_KEYS = ["training.epochs=1", "early_stopping.enabled=false"]


def worker_torchrec(shards: Path) -> dict[str, Any]:
    """TorchRec's DLRM_DCN as ``torchrec_dlrm``'s dlrm_main.py trains it, on one gloo process."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM_DCN, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recsys.config import load_config
    from recsys.data.shards import ShardedSplit
    from recsys.metrics import CTRMetrics

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    dist.init_process_group("gloo", rank=0, world_size=1)
    # The table optimizer of recsys's DLRM-DCNv2 recipe: the same sparse rate and eps.
    recipe = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml", MODEL_KEYS["dlrm_dcnv2"])
    shape, opt, dims = model_shape(), recipe.optimizer, recipe.model.dlrm_dcnv2
    meta = json.loads((shards / "metadata.json").read_text())
    sparse, dense = meta["features"]["sparse"], meta["features"]["dense"]
    dim, batch = shape["embedding_dim"], shape["batch_size"]
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=meta["table_sizes"][f], feature_names=[f])
              for f in sparse]  # fmt: skip
    model = DLRM_DCN(EmbeddingBagCollection(tables=tables, device=torch.device("meta")), len(dense), [*dims.bottom_layers, dim],
                     [*shape["deep_layers"], 1], dcn_num_layers=dims.cross_layers, dcn_low_rank_dim=dims.low_rank)  # fmt: skip
    train_model = DLRMTrain(model)
    apply_optimizer_in_backward(torch.optim.Adagrad, train_model.model.sparse_arch.parameters(),
                                {"lr": opt.sparse_lr, "eps": opt.sparse_eps})  # fmt: skip
    planner = EmbeddingShardingPlanner(topology=Topology(local_world_size=1, world_size=1, compute_device="cpu"),
                                       batch_size=batch, storage_reservation=HeuristicalStorageReservation(percentage=0.05))  # fmt: skip
    plan = planner.collective_plan(train_model, get_default_sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=train_model, device=torch.device("cpu"), plan=plan)
    dense_optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                            lambda params: torch.optim.Adagrad(params, lr=TORCHREC_DENSE_LR))  # fmt: skip
    pipeline = TrainPipelineSparseDist(dmp, CombinedOptimizer([dmp.fused_optimizer, dense_optimizer]), torch.device("cpu"),
                                       execute_all_batches=True)  # fmt: skip
    train = ShardedSplit(str(shards / "train"))
    # The example's DataLoader (batch_size=None, no workers) builds each batch in the training process, as
    # recsys's loader does here with prefetch 0 (also recsys's own choice on these 2 cores: prefetch_depth).
    batches = iter(train.batches(batch, shuffle=True, seed=0, prefetch=0))
    step_ends = [time.perf_counter()]
    dmp.train()
    while True:
        try:
            pipeline.progress(batches)
        except StopIteration:
            break
        step_ends.append(time.perf_counter())
    dmp = pipeline.detach()  # the plain forward again (the pipeline swapped in its own)
    dmp.eval()
    metrics = CTRMetrics()
    test = ShardedSplit(str(shards / "test"))
    start, rows = time.perf_counter(), 0
    with torch.no_grad():
        for b in test.batches(shape["eval_batch_size"], shuffle=False):
            _, (_, logits, labels) = dmp(b)
            metrics.update(logits, labels)
            rows += len(labels)
    eval_seconds = time.perf_counter() - start
    result = metrics.compute()
    return {**steady_rate(step_ends, batch, len(train)), "eval_samples_per_s": round(rows / eval_seconds),
            "test_auc": result["auc"], "test_logloss": result["logloss"], "epoch": True}  # fmt: skip


def run_torchrec(shards: Path, work: Path, threads: int) -> dict[str, Any]:
    out = work / "torchrec.json"
    command = [sys.executable, __file__, "--worker", str(shards), str(out), str(threads)]
    measured = measure_process(command)
    return with_measures(json.loads(out.read_text()), measured)


def regime_summary(regime: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios of the issue's targets: DLRM-DCNv2 vs TorchRec's DLRM_DCN, DeepFM vs plain, every model's
    AUC over plain's."""
    out: dict[str, Any] = {"bench": "models_summary", "regime": regime}
    ours, theirs, plain = results.get("recsys_dlrm_dcnv2"), results.get("torchrec_dlrm_dcn"), results.get("plain")
    if ours and theirs:
        out["dlrm_dcnv2_speed_vs_torchrec"] = round(ours["train_samples_per_s"] / theirs["train_samples_per_s"], 2)
        out["dlrm_dcnv2_auc_minus_torchrec"] = round(ours["test_auc"] - theirs["test_auc"], 4)
    if plain:
        if "recsys_deepfm" in results:
            out["deepfm_speed_vs_plain"] = round(results["recsys_deepfm"]["train_samples_per_s"] / plain["train_samples_per_s"], 2)
        for name, result in results.items():
            if name.startswith("recsys_"):
                out[f"{name[7:]}_auc_minus_plain"] = round(result["test_auc"] - plain["test_auc"], 4)
    return out


# The contenders of the speed ratios: timed ``repeats`` times, interleaved, each reporting its median.
TIMED = ("recsys_deepfm", "recsys_dlrm_dcnv2", "plain", "torchrec_dlrm_dcn")


def run_contender(contender: str, shards: Path, run_work: Path, threads: int, slow_steps: int) -> dict[str, Any]:
    shutil.rmtree(run_work, ignore_errors=True)  # a rerun's metrics.jsonl starts empty
    run_work.mkdir(parents=True)
    # The previous contender's checkpoint (4 GiB with Kaggle-sized tables) is written back to disk
    # before this one starts, not during its training: overlapping, it cost recsys's DLRM-DCNv2
    # 40% of its rate on Kaggle-sized tables (31,755 samples/s right after DCNv2's run, 53,292).
    os.sync()
    if contender == "plain":
        return run_in_worker("plain", shards, run_work, slow_steps, threads)
    if contender == "torchrec_dlrm_dcn":
        return run_torchrec(shards, run_work, threads)
    model = contender.removeprefix("recsys_")
    return run_recsys(shards, run_work, [f"model.name={model}", *MODEL_KEYS[model], *COMMON_KEYS])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's runs -> the first run's line with the median train and eval rates (each run's listed)."""
    out = dict(runs[0])
    if len(runs) > 1:
        for key in ("train_samples_per_s", "eval_samples_per_s"):
            out[key] = round(statistics.median(r[key] for r in runs))
        out["train_samples_per_s_runs"] = [r["train_samples_per_s"] for r in runs]
        out["other_cores_runs"] = [r["other_cores"] for r in runs]
        out["steal_pct_runs"] = [r["steal_pct"] for r in runs]
    return out


def run_models(raw: Path, work: Path, regimes: list[str], threads: int, slow_steps: int, repeats: int,
               host: dict[str, Any]) -> None:  # fmt: skip
    for regime in regimes:
        shards = preprocess(raw, work / f"shards_{regime}", MODEL_REGIMES[regime])
        contenders = [*(f"recsys_{m}" for m in MODELS), "plain", "torchrec_dlrm_dcn"]
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
        for round_ in range(repeats):  # later rounds: the timed contenders, every other round in reverse order
            order = contenders if round_ == 0 else [c for c in contenders if c in TIMED][:: -1 if round_ % 2 else 1]
            for contender in order:
                runs[contender].append(run_contender(contender, shards, work / f"{contender}_{regime}", threads, slow_steps))
        results = {contender: median_of(contender_runs) for contender, contender_runs in runs.items()}
        for contender, result in results.items():
            line = {"bench": contender, "regime": regime, "table_rows": sum(MODEL_REGIMES[regime]), **result, **host}
            print(json.dumps(line), flush=True)
        print(json.dumps(regime_summary(regime, results)), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    shards_arg, out_arg, threads_arg = sys.argv[2:5]
    os.environ["OMP_NUM_THREADS"] = threads_arg
    import torch

    torch.set_num_threads(int(threads_arg))
    Path(out_arg).write_text(json.dumps(worker_torchrec(Path(shards_arg))))
