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


def load(export_dir: str | Path, batch_size: int = 16384, verify: bool | None = None, backend: str = "torchscript") -> Scorer:
    """The export folder ``export_dir`` as a :class:`Scorer` (``score(frame_or_lines)`` -> probabilities).

    The manifest's fields and every file's size are always checked; ``verify`` compares sha256 too (None:
    when the files total at most ``recsys.serving.manifest.VERIFY_BELOW_BYTES``). ``backend``: the model
    file it runs (``torchscript``, or ``torch_export`` / ``aoti``: ``recsys.serving.exported``)."""
    from recsys.serving.scorer import Scorer

    return Scorer(export_dir, batch_size, verify, backend)
