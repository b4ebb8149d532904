"""recsys against the DeepFMs users compare it with, on the same rows, features and architecture.

    pip install -e .[bench]          # DeepCTR-Torch and scikit-learn (the optional third contender)
    flock /tmp/bench.lock python tools/bench.py [--rows 1250000] [--threads 2] [--regimes small,kaggle]
    flock /tmp/bench.lock python tools/bench.py --models [--rows 500000]   # every model: tools/bench_models.py

Generates Criteo-format rows with a planted model (``recsys generate``; 80/10/10 train/val/test), hashes the
categorical ids into the tables of each regime with ``recsys preprocess --sparse-mode hash``, then for each
contender and regime, in a fresh process with ``--threads`` intra-op threads, trains one epoch over the train
split and evaluates on the test split:

* ``recsys``: ``configs/synthetic.yaml`` with only its data paths changed (DistributedModelParallel, fused
  FBGEMM sparse optimizer, a DCP checkpoint at the epoch end); then ``recsys eval`` of that checkpoint in
  a second process, so checkpoint save *and* load are inside the measured peaks.
* ``plain``: the DeepFM blog posts write in plain PyTorch, with the fixes they need to converge on
  Criteo-sized ids (per-id first-order weights, N(0, 0.01) init): one ``nn.Embedding`` per field, every
  parameter under ``torch.optim.Adam``.
* ``deepctr``: DeepCTR-Torch's ``DeepFM`` (``model.fit``), when installed; small tables only (its dense
  Adam over Kaggle-sized tables is the ``plain`` case again, slower).

All contenders share recsys's model shape: embedding dim D, MLP ``model.deep_layers``, dense features as
value-scaled field vectors (DeepCTR feeds them to its MLP and linear part, its own design).

Regimes: ``small`` (the 26 Criteo-Kaggle cardinalities capped at 40k rows) and ``kaggle`` (the 26 cardinalities
themselves, 33.8M rows). A contender whose epoch would take too long runs ``--slow-steps`` steps instead; its
line says ``"steps"`` and ``"epoch": false``.

Train samples/s count the steps after the first ``WARMUP_STEPS`` (20) for recsys and the plain loop alike
(DeepCTR's ``model.fit``: every step); ``train_samples_per_s_all_steps`` counts every step.

Prints one JSON line per contender and regime (train and eval samples/s, peak RSS of the process tree,
test AUC / logloss, the CPU other processes and the hypervisor took meanwhile), one for the box's bound (the MLP alone: forward, backward and Adam step at the same
width and batch) and a summary line with the ratios. Run it alone on the machine: other load skews it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import run_measured  # noqa: E402

from recsys.data.synthetic import CRITEO_KAGGLE_VOCAB  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KAGGLE_CARDINALITIES = CRITEO_KAGGLE_VOCAB  # recsys.data.synthetic: Criteo Kaggle's table sizes
SMALL_TABLE_ROWS = 40_000
REGIMES = {
    "small": [min(n, SMALL_TABLE_ROWS) for n in KAGGLE_CARDINALITIES],
    "kaggle": KAGGLE_CARDINALITIES,
}
CONTENDERS = ("recsys", "plain", "deepctr")


# ----------------------------------------------------------------------------------------------- data


def prepare_data(work: Path, rows: int, seed: int = 0) -> Path:
    """Generated rows of the planted model with this seed (its parameters and draws), reused when present."""
    from recsys.data.synthetic import SyntheticSpec, generate_splits

    raw = work / ("raw" if seed == 0 else f"raw_seed{seed}")
    if not (raw / "oracle.json").exists():
        generate_splits(raw, rows, SyntheticSpec(seed=seed))
    return raw


def preprocess(raw: Path, out: Path, table_sizes: list[int]) -> Path:
    """Hash mode with one bucket count per feature: the same table rows for every contender."""
    import yaml

    if (out / "metadata.json").exists():
        return out
    schema = yaml.safe_load((REPO / "configs" / "schemas" / "criteo.yaml").read_text())
    schema.update(sparse_mode="hash", hash_buckets=dict(zip(schema["sparse"], table_sizes)))
    out.mkdir(parents=True, exist_ok=True)
    schema_path = out.parent / f"{out.name}.schema.yaml"
    schema_path.write_text(yaml.safe_dump(schema))
    splits = [f"{s}={raw / f'{s}.tsv'}" for s in ("train", "val", "test")]
    subprocess.run(
        [sys.executable, "-m", "recsys", "preprocess", "--schema", str(schema_path), "--split", "files",
         "--out", str(out), "--no-progress", *splits],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def read_split(shards: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels [N] float32, dense [N, 13] float32, sparse [N, 26] int64: the split's rows in file order."""
    meta = json.loads((shards / "metadata.json").read_text())
    parts = [shards / split / s["name"] for s in meta["splits"][split]["shards"]]
    labels = np.concatenate([np.load(p / "labels.npy") for p in parts]).astype(np.float32)
    dense = np.concatenate([np.load(p / "dense.npy") for p in parts]).astype(np.float32)
    sparse = np.concatenate([np.load(p / "sparse.npy") for p in parts]).astype(np.int64)
    return labels, dense, sparse


@functools.cache
def model_shape() -> dict[str, Any]:
    from recsys.config import load_config

    config = load_config(REPO / "configs" / "synthetic.yaml")
    model, data = config.model, config.data
    return {"embedding_dim": model.embedding_dim, "deep_layers": model.deep_layers, "batch_size": data.batch_size,
            "eval_batch_size": data.eval_batch_size}  # fmt: skip


# ------------------------------------------------------------------------------------------ contenders


WARMUP_STEPS = 20


def steady_rate(step_ends: list[float], batch: int, rows: int) -> dict[str, Any]:
    """Train samples/s after the first ``WARMUP_STEPS`` steps (``step_ends``: the clock before the first step
    and after each), and the rate over every step; the last batch holds the epoch's remaining rows."""
    steps = len(step_ends) - 1
    warm = min(WARMUP_STEPS, steps // 2)
    samples = min(steps * batch, rows)
    return {"train_samples_per_s": round((samples - warm * batch) / (step_ends[-1] - step_ends[warm])),
            "train_samples_per_s_all_steps": round(samples / (step_ends[-1] - step_ends[0])), "steps": steps}


def train_recsys(shards: Path, run_dir: Path, overrides: list[str] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``recsys train configs/synthetic.yaml`` on ``shards`` -> (``measure_process``'s, metrics.jsonl records)."""
    command = [sys.executable, "-m", "recsys", "train", str(REPO / "configs" / "synthetic.yaml"),
               *recsys_overrides(shards, run_dir), *overrides]  # fmt: skip
    measured = measure_process(command)
    return measured, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def recsys_overrides(shards: Path, run_dir: Path) -> list[str]:
    return [f"data.{s}={shards / s}" for s in ("train", "val", "test")] + [
        f"training.run_dir={run_dir}", "training.resume=false", "logging.progress_bar=false",
        "logging.tensorboard=false", f"logging.log_every_steps={WARMUP_STEPS}",
    ]  # fmt: skip


def run_recsys(shards: Path, work: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """configs/synthetic.yaml with its data paths pointed at the regime's shards (and ``overrides``); train,
    then eval."""
    run_dir = work / "run"
    trained, records = train_recsys(shards, run_dir, overrides)
    batch = model_shape()["batch_size"]
    # Each window of logging.log_every_steps (= WARMUP_STEPS) logs its rate: the first is the warm-up.
    windows, last_step = [], 0
    for r in (r for r in records if r["stage"] == "train"):
        windows.append(((r["step"] - last_step) * batch, (r["step"] - last_step) * batch / r["samples_per_s"]))
        last_step = r["step"]
    steady = windows[1:] if len(windows) > 1 else windows
    evaluated = measure_process([sys.executable, "-m", "recsys", "eval", str(REPO / "configs" / "synthetic.yaml"),
                                 *recsys_overrides(shards, run_dir), *overrides, "--split", "test"])  # fmt: skip
    test = [r for r in records if r["stage"] == "test"][-1]
    return {
        "train_samples_per_s": round(sum(n for n, _ in steady) / sum(t for _, t in steady)),
        "train_samples_per_s_all_steps": round(sum(n for n, _ in windows) / sum(t for _, t in windows)),
        "eval_samples_per_s": round(test["samples_per_s"]),
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "steps": last_step,
        "epoch": True,
        "peak_rss_gib": round(max(trained["peak_rss"], evaluated["peak_rss"]) / 2**30, 3),
        "peak_rss_gib_train_and_save": round(trained["peak_rss"] / 2**30, 3),
        "peak_rss_gib_load_and_eval": round(evaluated["peak_rss"] / 2**30, 3),
        "other_cores": trained["other_cores"],
        "steal_pct": trained["steal_pct"],
    }


def _worker_command(contender: str, shards: Path, out: Path, slow_steps: int, threads: int) -> list[str]:
    return [sys.executable, __file__, "--worker", contender, "--shards", str(shards), "--result", str(out),
            "--slow-steps", str(slow_steps), "--threads", str(threads)]  # fmt: skip


def run_in_worker(contender: str, shards: Path, work: Path, slow_steps: int, threads: int) -> dict[str, Any]:
    out = work / f"{contender}.json"
    measured = measure_process(_worker_command(contender, shards, out, slow_steps, threads))
    return with_measures(json.loads(out.read_text()), measured)


def with_measures(result: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """A worker's result with ``measure_process``'s figures."""
    return {**result, "peak_rss_gib": round(measured["peak_rss"] / 2**30, 3), "other_cores": measured["other_cores"],
            "steal_pct": measured["steal_pct"]}


class PlainDeepFM:
    """Built lazily so that ``import torch`` happens in the worker process only."""

    @staticmethod
    def build(table_sizes: list[int], num_dense: int, dim: int, layers: list[int]) -> Any:
        import torch
        from torch import nn

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in table_sizes)
                self.first_order = nn.ModuleList(nn.Embedding(n, 1) for n in table_sizes)
                for table in [*self.embeddings, *self.first_order]:
                    nn.init.normal_(table.weight, std=0.01)
                self.dense_vectors = nn.Parameter(torch.randn(num_dense, dim) * 0.01)
                self.dense_linear = nn.Linear(num_dense, 1)
                blocks: list[nn.Module] = []
                width = (num_dense + len(table_sizes)) * dim
                for size in layers:
                    blocks += [nn.Linear(width, size), nn.ReLU()]
                    width = size
                self.mlp = nn.Sequential(*blocks, nn.Linear(width, 1))

            def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
                vectors = torch.stack([e(sparse[:, i]) for i, e in enumerate(self.embeddings)], dim=1)
                first = torch.cat([e(sparse[:, i]) for i, e in enumerate(self.first_order)], dim=1).sum(1)
                fields = torch.cat([dense.unsqueeze(-1) * self.dense_vectors, vectors], dim=1)
                fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)
                deep = self.mlp(fields.flatten(1)).squeeze(-1)
                return first + self.dense_linear(dense).squeeze(-1) + fm + deep

        return Model()


def worker_plain(shards: Path, slow_steps: int) -> dict[str, Any]:
    import torch

    from recsys.metrics import CTRMetrics

    shape = model_shape()
    meta = json.loads((shards / "metadata.json").read_text())
    sizes = [meta["table_sizes"][f] for f in meta["features"]["sparse"]]
    torch.manual_seed(0)
    model = PlainDeepFM.build(sizes, len(meta["features"]["dense"]), shape["embedding_dim"], shape["deep_layers"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    labels, dense, sparse = (torch.from_numpy(a) for a in read_split(shards, "train"))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    batch = shape["batch_size"]
    steps = -(-len(labels) // batch)
    epoch = sum(sizes) <= 2_000_000  # dense Adam over every table row: Kaggle-sized tables run slow_steps
    steps = steps if epoch else min(steps, slow_steps)
    step_ends = [time.perf_counter()]
    for step in range(steps):
        rows = order[step * batch : (step + 1) * batch]
        loss = loss_fn(model(dense[rows], sparse[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_ends.append(time.perf_counter())
    return {**steady_rate(step_ends, batch, len(labels)), "epoch": epoch,
            **evaluate_plain(model, shards, shape["eval_batch_size"], CTRMetrics())}


def evaluate_plain(model: Any, shards: Path, batch: int, metrics: Any) -> dict[str, Any]:
    import torch

    labels, dense, sparse = (torch.from_numpy(a) for a in read_split(shards, "test"))
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(labels), batch):
            metrics.update(model(dense[lo : lo + batch], sparse[lo : lo + batch]), labels[lo : lo + batch])
    seconds = time.perf_counter() - start
    result = metrics.compute()
    return {"eval_samples_per_s": round(len(labels) / seconds), "test_auc": result["auc"],
            "test_logloss": result["logloss"]}  # fmt: skip


def worker_deepctr(shards: Path, slow_steps: int) -> dict[str, Any]:
    import torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM
    from sklearn.metrics import log_loss, roc_auc_score

    shape = model_shape()
    meta = json.loads((shards / "metadata.json").read_text())
    dense_names, sparse_names = meta["features"]["dense"], meta["features"]["sparse"]
    columns = [SparseFeat(f, meta["table_sizes"][f], embedding_dim=shape["embedding_dim"]) for f in sparse_names]
    columns += [DenseFeat(f, 1) for f in dense_names]
    torch.manual_seed(0)
    model = DeepFM(columns, columns, dnn_hidden_units=tuple(shape["deep_layers"]), device="cpu", seed=0)
    model.compile("adam", "binary_crossentropy")

    def inputs(split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        labels, dense, sparse = read_split(shards, split)
        x = {f: sparse[:, i] for i, f in enumerate(sparse_names)} | {f: dense[:, i] for i, f in enumerate(dense_names)}
        return x, labels

    x, y = inputs("train")
    start = time.perf_counter()
    model.fit(x, y, batch_size=shape["batch_size"], epochs=1, verbose=0, shuffle=True)
    train_seconds = time.perf_counter() - start
    x_test, y_test = inputs("test")
    start = time.perf_counter()
    predictions = model.predict(x_test, batch_size=shape["eval_batch_size"])
    eval_seconds = time.perf_counter() - start
    return {
        "train_samples_per_s": round(len(y) / train_seconds),
        "eval_samples_per_s": round(len(y_test) / eval_seconds),
        "test_auc": float(roc_auc_score(y_test, predictions)),
        "test_logloss": float(log_loss(y_test, np.clip(predictions, 1e-7, 1 - 1e-7))),
        "steps": -(-len(y) // shape["batch_size"]),
        "epoch": True,
    }


def worker_mlp_bound(steps: int = 30) -> dict[str, Any]:
    """The box's ceiling for this model: its MLP alone (forward, backward, Adam) on random inputs."""
    import torch
    from torch import nn

    shape = model_shape()
    width = (13 + 26) * shape["embedding_dim"]
    blocks: list[nn.Module] = []
    for size in shape["deep_layers"]:
        blocks += [nn.Linear(width, size), nn.ReLU()]
        width = size
    mlp = nn.Sequential(*blocks, nn.Linear(width, 1))
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    x = torch.randn(shape["batch_size"], (13 + 26) * shape["embedding_dim"])
    y = torch.rand(shape["batch_size"]).round()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(steps + 5):
        if step == 5:  # warm-up steps first
            start = time.perf_counter()
        loss = loss_fn(mlp(x).squeeze(-1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"train_samples_per_s": round(steps * shape["batch_size"] / (time.perf_counter() - start))}


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {"plain": worker_plain, "deepctr": worker_deepctr}


# ------------------------------------------------------------------------------------------- measuring


def box_cpu() -> tuple[float, float, float]:
    """(busy, steal, all) CPU seconds of the machine since boot, summed over its cores (/proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in open("/proc/stat").readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick, (user + nice + system + idle + iowait + irq + softirq + steal) / tick


def measure_process(command: list[str]) -> dict[str, Any]:
    """Runs ``command`` to completion -> ``peak_rss`` (bytes, its process tree), and what else took the
    machine meanwhile: ``other_cores`` (busy CPU seconds outside its tree and this process, per second of its
    run: other users' processes) and ``steal_pct`` (time the hypervisor gave the VM's cores to other guests)."""
    before, children, own = box_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    proc, _, errors, peak = run_measured(command, {"PYTHONUNBUFFERED": "1"}, pss=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{errors[-4000:]}")
    wall, after = time.perf_counter() - started, box_cpu()
    ours = sum(getattr(resource.getrusage(who), f) - getattr(then, f) for who, then in
               ((resource.RUSAGE_CHILDREN, children), (resource.RUSAGE_SELF, own)) for f in ("ru_utime", "ru_stime"))  # fmt: skip
    return {"peak_rss": peak["rss"], "other_cores": round(max(0.0, after[0] - before[0] - ours) / wall, 2),
            "steal_pct": round(100 * (after[1] - before[1]) / max(after[2] - before[2], 1e-9), 1)}


def summary(results: dict[tuple[str, str], dict[str, Any]], bound: float) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "summary"}
    for regime in REGIMES:
        mine = results.get(("recsys", regime))
        if not mine:
            continue
        for other in ("plain", "deepctr"):
            theirs = results.get((other, regime))
            if theirs:
                out[f"{regime}_speed_vs_{other}"] = round(mine["train_samples_per_s"] / theirs["train_samples_per_s"], 2)
                out[f"{regime}_auc_minus_{other}"] = round(mine["test_auc"] - theirs["test_auc"], 4)
                out[f"{regime}_peak_rss_vs_{other}"] = round(mine["peak_rss_gib"] / theirs["peak_rss_gib"], 2)
        if regime == "small":
            out["small_fraction_of_mlp_bound"] = round(mine["train_samples_per_s"] / bound, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_250_000, help="generated rows, 80%% train (default 1.25M)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every contender")
    parser.add_argument("--regimes", help="default small,kaggle; with --models tiny,small,kaggle")
    parser.add_argument("--models", action="store_true", help="every recsys model, plain DeepFM and TorchRec's "
                        "DLRM_DCN (tools/bench_models.py)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"who trains, comma-separated, of {','.join(CONTENDERS)} (deepctr: small tables only)")
    parser.add_argument("--slow-steps", type=int, default=10, help="steps of a contender too slow for an epoch")
    parser.add_argument("--repeats", type=int, default=3, help="with --models: rounds of the contenders of "
                        "the speed ratios, interleaved; each reports its median (default 3)")
    parser.add_argument("--work", type=Path, help="keep generated data and runs here (reused when present)")
    parser.add_argument("--worker", choices=[*WORKERS, "mlp"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every contender's process
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = worker_mlp_bound() if args.worker == "mlp" else WORKERS[args.worker](args.shards, args.slow_steps)
        args.result.write_text(json.dumps(result))
        return

    import torch

    host = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, **model_shape()}  # fmt: skip
    contenders = args.contenders.split(",")
    if "deepctr" in contenders:
        try:
            import deepctr_torch  # noqa: F401
        except ImportError:
            print(json.dumps({"bench": "deepctr", "skipped": "not installed: pip install -e .[bench]"}), flush=True)
            contenders.remove("deepctr")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        raw = prepare_data(work, args.rows)
        if args.models:
            from bench_models import run_models

            run_models(raw, work, (args.regimes or "tiny,small,kaggle").split(","), args.threads, args.slow_steps,
                       args.repeats, host)  # fmt: skip
            return
        mlp = work / "mlp.json"
        subprocess.run([sys.executable, __file__, "--worker", "mlp", "--result", str(mlp), "--threads",
                        str(args.threads)], check=True)  # fmt: skip
        bound = json.loads(mlp.read_text())["train_samples_per_s"]
        print(json.dumps({"bench": "mlp_bound", **json.loads(mlp.read_text()), **host}), flush=True)
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for regime in (args.regimes or "small,kaggle").split(","):
            shards = preprocess(raw, work / f"shards_{regime}", REGIMES[regime])
            for contender in contenders:
                if contender == "deepctr" and regime != "small":
                    continue
                run_work = work / f"{contender}_{regime}"
                run_work.mkdir(parents=True, exist_ok=True)
                if contender == "recsys":
                    result = run_recsys(shards, run_work)
                else:
                    result = run_in_worker(contender, shards, run_work, args.slow_steps, args.threads)
                results[(contender, regime)] = result
                line = {"bench": contender, "regime": regime, "table_rows": sum(REGIMES[regime]), **result, **host}
                print(json.dumps(line), flush=True)
        print(json.dumps(summary(results, bound)), flush=True)


if __name__ == "__main__":
    main()
