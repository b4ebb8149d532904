"""Every tool in tools/ runs, at tiny size, from the repository root as the docs say; every option says what it does.

The benchmarks need the `bench` extra (DeepCTR-Torch, iopath): a missing one fails here rather than in a user's
hands. Figures at these sizes mean nothing; the checks are that each tool finishes and prints its JSON lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

# The tools with a command line; the other files in tools/ are modules those import (bench_models, bench_online).
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py") if "ArgumentParser(" in p.read_text())
# Tools with sub-commands: each has its own options.
SUBCOMMANDS = {"bench_preprocess.py": ["preprocess", "loader"]}


def run_main(tool: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``python tools/TOOL ARGS`` in this process, for the tools that train nothing; returns what it printed."""
    monkeypatch.setattr(sys, "argv", [tool, *args])
    monkeypatch.setattr(sys, "path", [str(REPO / "tools"), *sys.path])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(str(REPO / "tools" / tool), run_name="__main__")
        except SystemExit as done:  # argparse's --help, or a tool ending with sys.exit
            assert done.code in (0, None), f"tools/{tool} {' '.join(args)} exited {done.code}"
    return out.getvalue()


def undocumented(text: str) -> list[str]:
    """Arguments in argparse's listings (``positional arguments:``, ``options:`` and the argument groups after
    them) without a description: an entry line (two-space indent) with nothing after its name and no
    continuation line (deeper indent) below it."""
    missing, lines, listing, started = [], text.splitlines(), False, False
    for i, line in enumerate(lines):
        if line in ("positional arguments:", "options:", "optional arguments:") or (started and re.match(r"^\S.*:$", line)):
            listing = started = True
        elif not line.strip():
            listing = False
        elif listing and re.match(r"^  \S", line):
            described = len(re.split(r"\s{2,}", line.strip())) > 1
            continued = i + 1 < len(lines) and re.match(r"^ {3,}\S", lines[i + 1]) is not None
            if not (described or continued):
                missing.append(line.strip())
    return missing


def test_undocumented_finds_a_bare_option() -> None:
    text = ("Description:\n  an indented line of the description\n\npositional arguments:\n  grid\n\n"
            "options:\n  -h, --help     show this help\n  --rows ROWS\n  --long-option LONG\n                 wrapped help\n\n"
            "online:\n  --sizes SIZES\n")
    assert undocumented(text) == ["grid", "--rows ROWS", "--sizes SIZES"]


@pytest.mark.parametrize(
    "tool,args", [(tool, []) for tool in TOOLS] + [(t, [s]) for t, subs in SUBCOMMANDS.items() for s in subs]
)
def test_every_option_says_what_it_does(tool: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = run_main(tool, *args, "--help", monkeypatch=monkeypatch)
    assert "options:" in text
    assert undocumented(text) == [], f"tools/{tool} {' '.join(args)}: options without help"


def run_tool(*args: str, timeout: float = 600) -> list[dict]:
    """Runs ``python tools/...`` in the repository root; returns the JSON lines it printed."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_preprocess_criteo(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = [f"{split}={tiny_raw / f'{split}.tsv'}" for split in ("train", "val", "test")]
    run_main("preprocess_criteo.py", "--split", "files", "--out", str(tmp_path / "out"), "--no-progress",
             "--workers", "1", *splits, monkeypatch=monkeypatch)  # fmt: skip
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["splits"]["train"]["rows"] == 1_200


def test_bench_loader_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    (line,) = run_main("bench_loader_checks.py", "--batch", "64", "--repeats", "2", monkeypatch=monkeypatch).splitlines()
    assert json.loads(line)["batch_rows"] == 64


@pytest.mark.slow
def test_bench_preprocess_against_torchrec(tmp_path: Path) -> None:
    lines = run_tool("tools/bench_preprocess.py", "preprocess", "--rows", "2000", "--data", str(tmp_path))
    assert {line["bench"] for line in lines} >= {"tool_hash", "tool_vocab", "torchrec_tsv_to_npys", "preprocess_summary"}


@pytest.mark.slow
def test_bench_preprocess_loader(tiny_criteo: Path) -> None:
    lines = run_tool("tools/bench_preprocess.py", "loader", "--shards", str(tiny_criteo), "--loader-batches", "3",
                     "--train-steps", "3")  # fmt: skip
    assert {line["bench"] for line in lines} >= {"loader", "train"}


@pytest.mark.slow
def test_bench_train() -> None:
    lines = run_tool("tools/bench_train.py", "--rows", "6000", "--steps", "50")
    assert len(lines) == 3 and lines[-1]["bench"] == "plan"


@pytest.mark.slow
def test_bench_serving(tmp_path: Path) -> None:
    lines = run_tool("tools/bench_serving.py", "--rows", "6000", "--work", str(tmp_path))
    assert lines[-1]["bench"] == "serving_summary" and lines[-1]["int8_size_ratio"] > 1


@pytest.mark.slow
def test_bench_every_contender(tmp_path: Path) -> None:
    lines = run_tool("tools/bench.py", "--rows", "6000", "--regimes", "small", "--work", str(tmp_path))
    assert {line["bench"] for line in lines if "regime" in line} == {"recsys", "plain", "deepctr"}
    assert "small_speed_vs_deepctr" in lines[-1]


@pytest.mark.slow
def test_sweep(tmp_path: Path) -> None:
    lines = run_tool("tools/sweep.py", "--seeds", "0", "--rows", "6000", "--work", str(tmp_path), "model.dropout=0.1")
    assert lines[-1]["ranking"][0]["overrides"] == "model.dropout=0.1"


def test_bench_models_recipes_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each model's recipe keys in tools/bench_models.py are valid overrides of configs/synthetic.yaml: a
    misspelt key fails here, not after half an hour of ``tools/bench.py --models``."""
    from recsys.config import load_config
    from recsys.models.registry import MODELS

    monkeypatch.setattr(sys, "path", [str(REPO / "tools"), *sys.path])
    from bench_models import COMMON_KEYS, MODEL_KEYS

    assert set(MODEL_KEYS) == set(MODELS)
    for model, keys in MODEL_KEYS.items():
        config = load_config(REPO / "configs" / "synthetic.yaml", [f"model.name={model}", *keys, *COMMON_KEYS])
        assert config.model.name == model and config.training.epochs == 1
