"""The docs cannot drift from the code: every fenced block of README.md and docs/*.md is checked by its info string.

- ``bash`` / ``python``: run (slow part), page by page, blocks in page order, each page in a fresh copy of the
  repository where the demo has run at small scale (``demo_world``). Small scale is explicit: ``SMALL``
  rewrites the large sizes the blocks name and nothing else, so a documented command that breaks fails here.
- ``bash skip`` / ``python skip``: not run; the line before the fence must give the reason as
  ``<!-- skip: reason -->``, and each skipped block shows in pytest's summary by page, line and reason.
- ``text``, ``yaml``, ``console``, ``json``: output and configs, not run.
- anything else, no info string included: fails, so no block escapes by a typo.

The fast part also checks that every relative link (a page, a heading in it, a repository file) resolves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = {"bash", "python"}
SKIP = {"bash skip", "python skip"}
SHOWN = {"text", "yaml", "console", "json"}
# The large sizes blocks name, and what the test runs instead: the demo's 1M generated rows become 20k (8 steps
# of 4096 in two epochs), so a warmup sized for the full run's 392 steps shrinks with them.
SMALL = {"--rows 1000000": "--rows 20000", "schedule.warmup_steps=100": "schedule.warmup_steps=2"}
# What a copy of the repository leaves out: the venv (linked instead), git, and data or runs made here.
NOT_COPIED = {".git", ".venv", "data", "runs", ".pytest_cache"}
FENCE = re.compile(r"^```(.*)$")
SKIP_REASON = re.compile(r"^<!-- skip: (.+) -->$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    body: str
    skip_reason: str  # from the comment on the line before the fence; "" when absent

    @property
    def name(self) -> str:
        first = next((line for line in self.body.splitlines() if line.strip()), "")
        return f"{self.page.relative_to(REPO)}:{self.line} ({first[:60]})"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page in order; an unclosed fence fails naming its line."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.relative_to(REPO)}:{i + 1}: fence never closed"
        reason = SKIP_REASON.match(lines[i - 1]) if i else None
        found.append(Block(page, i + 1, opening.group(1).strip(), "\n".join(lines[i + 1:end]) + "\n",
                           reason.group(1).strip() if reason else ""))
        i = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def test_every_block_says_whether_it_runs() -> None:
    unknown = [f"{b.name}: info string {b.info!r}" for b in ALL_BLOCKS if b.info not in RUN | SKIP | SHOWN]
    assert not unknown, "blocks must be one of " + str(sorted(RUN | SKIP | SHOWN)) + ":\n" + "\n".join(unknown)


def test_skip_comments_sit_on_skipped_blocks() -> None:
    """A reason on a block that runs (or on no block) is a leftover that would mislead a reader."""
    misplaced = [f"{b.name}: has a skip reason but info string {b.info!r}" for b in ALL_BLOCKS
                 if b.skip_reason and b.info not in SKIP]
    for page in PAGES:
        lines = page.read_text().splitlines()
        misplaced += [f"{page.relative_to(REPO)}:{n + 1}: skip reason not followed by a fence"
                      for n, line in enumerate(lines)
                      if SKIP_REASON.match(line) and not (n + 1 < len(lines) and FENCE.match(lines[n + 1]))]
    assert not misplaced, "\n".join(misplaced)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.info in SKIP], ids=lambda b: b.name)
def test_skipped_block(block: Block) -> None:
    """Each skipped block is listed in the summary (``-ra``) with its page, line and reason."""
    assert block.skip_reason, f"{block.name}: a skipped block needs `<!-- skip: reason -->` on the line before"
    pytest.skip(f"{block.name}: {block.skip_reason}")


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_resolve() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and anchor not in heading_anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_readme_is_short() -> None:
    """The README introduces; the manual lives in docs/."""
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/"


# ------------------------------------------------------------------------------------------ running blocks


def copy_repository(dest: Path) -> Path:
    """The checkout under test without git, data or runs; its .venv links to the venv running the tests."""
    dest.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name in NOT_COPIED or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, dest / entry.name)
    (dest / ".venv").symlink_to(sys.prefix)
    return dest


def run_block(block: Block, workdir: Path) -> None:
    body = block.body
    for large, small in SMALL.items():
        body = body.replace(large, small)
    shell = ["bash", "-euo", "pipefail", "-c", body] if block.info == "bash" else [sys.executable, "-c", body]
    env = child_env(PYTHONPATH=str(workdir))
    try:
        proc = subprocess.run(shell, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.name} ran over {BLOCK_TIMEOUT_S} s:\n{body}\n{(e.stdout or '')[-3000:]}")
    assert proc.returncode == 0, (
        f"{block.name} exited {proc.returncode}:\n{body}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-5000:]}"
    )


# The steps of `make demo` at small scale (one process instead of its 2-node TorchX job, which
# tests/launch/ covers), so that blocks may use data/synthetic and runs/synthetic as after the demo.
DEMO = """
recsys generate --rows 1000000 --out data/synthetic
python tools/preprocess_criteo.py --split files --out data/synthetic/shards \\
    train=data/synthetic/train.tsv val=data/synthetic/val.tsv test=data/synthetic/test.tsv
recsys train configs/synthetic.yaml
recsys export configs/synthetic.yaml
"""


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = copy_repository(tmp_path_factory.mktemp("docs") / "demo")
    run_block(Block(REPO / "Makefile", 0, "bash", DEMO, ""), world)
    return world


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.info in RUN for b in blocks(p))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_page_runs(page: Path, demo_world: Path, tmp_path: Path) -> None:
    """The page's runnable blocks, in order, in a fresh copy of the demo's repository."""
    workdir = tmp_path / "repo"
    shutil.copytree(demo_world, workdir, symlinks=True)
    for block in blocks(page):
        if block.info in RUN:
            run_block(block, workdir)
