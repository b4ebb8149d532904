"""Functions run on every rank of a local process group by the tests (module level so spawn can import them)."""

from __future__ import annotations

from typing import Any


def train_each(configs: list[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Runs ``recsys.train.train`` for each config dict in turn on this rank; returns each run's metrics."""
    from recsys.config import config_from_dict
    from recsys.train import train

    return [train(config_from_dict(values)) for values in configs]
