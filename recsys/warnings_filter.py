"""Hides the third-party notices that recsys triggers by design and that nobody running it can act on.

Each entry names the exact message (a regex matched at its start) and its category or logger, so a new or
different warning still shows. ``install()`` runs first thing in ``recsys`` (``recsys.cli.main``), which is
also what every torchrun/TorchX worker runs (``python -m recsys.cli``). ``RECSYS_WARNINGS=all`` turns it
off, showing everything as Python and torch would (``PYTHONWARNINGS=default`` also shows the
DeprecationWarnings that Python hides outside ``__main__``).

Versions: torch 2.13.0, torchrec 1.8.0. Drop an entry when an upgrade stops emitting it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "RECSYS_WARNINGS"


@dataclass(frozen=True)
class Known:
    """A notice recsys hides: ``warnings.warn(category)`` when ``logger`` is empty, else a record of
    ``logger``; ``message`` is a regex matched at the start of the message."""

    message: str
    category: type[Warning] = UserWarning
    logger: str = ""
    why: str = ""


KNOWN = (
    Known(
        r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers` instead",
        FutureWarning,
        why="TorchRec's DistributedModelParallel passes broadcast_buffers to DDP; once per rank of a "
        "multi-process run",
    ),
    Known(
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        FutureWarning,
        why="TorchRec's sharded tables are ShardedTensors; torch.distributed.checkpoint says so on every "
        "save and load",
    ),
    Known(
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
        r"single process",
        UserWarning,
        why="`recsys export` reads a sharded checkpoint into one process on purpose",
    ),
    Known(
        r"is_fx_tracing will return true for both fx\.symbolic_trace and torch\.export",
        logger="torch.fx._symbolic_trace",
        why="TorchRec's modules call torch.fx's is_fx_tracing(); torch logs this once per process",
    ),
)


class _DropKnown(logging.Filter):
    """Drops a logger's records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def install(environ: Mapping[str, str] = os.environ) -> bool:
    """Hides the ``KNOWN`` notices in this process, unless ``RECSYS_WARNINGS=all``. Idempotent. Returns
    whether it hid them."""
    if environ.get(ENV, "").strip().lower() == "all":
        return False
    patterns: dict[str, list[str]] = {}
    for known in KNOWN:
        if known.logger:
            patterns.setdefault(known.logger, []).append(known.message)
        else:
            warnings.filterwarnings("ignore", message=known.message, category=known.category)
    for name, messages in patterns.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropKnown)]:
            logger.removeFilter(old)
        logger.addFilter(_DropKnown(messages))
    return True
