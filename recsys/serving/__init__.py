"""Serving: score raw rows with an export folder (``recsys export``).

``recsys.serving.load(EXPORT)`` returns a :class:`~recsys.serving.scorer.Scorer`; ``recsys predict``
(:mod:`recsys.serving.predict`) streams raw log files through the same code. This package imports torch
lazily: ``recsys.serving.transform``, which worker processes use, needs none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recsys.serving.scorer import Scorer


def load(export_dir: str | Path, batch_size: int = 16384, backend: str = "torchscript") -> Scorer:
    """The export folder ``export_dir`` as a :class:`Scorer` (``score(frame_or_lines)`` -> probabilities);
    ``backend``: the model file it runs (``torchscript``, ``torch_export``, ``aoti``)."""
    from recsys.serving.scorer import Scorer

    return Scorer(export_dir, batch_size, backend)
