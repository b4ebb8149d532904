"""Raw click logs -> memory-mappable binary shards (``recsys preprocess``, ``tools/preprocess_criteo.py``).

One module per stage (the pipeline, in order, is described in ``pipeline``):

- ``base``: settings, constants and the error type;
- ``sources``: input files and the chunks cut from them;
- ``parse``: one chunk's lines -> checked, typed columns;
- ``encode``: tokens -> int64 keys -> table rows, dense transform;
- ``vocabulary``: vocab mode's token counts, merged into the vocabulary;
- ``writer``: chunk parts -> shards;
- ``pool``: the worker processes;
- ``pipeline``: ``run`` (the stages above in order, reuse of finished work, metadata);
- ``cli``: the command line.
"""

from recsys.data.preprocess.base import (
    FIRST_VOCAB_ID,
    MISSING_ID,
    NO_LABEL,
    OOV_ID,
    PreprocessError,
    Settings,
)
from recsys.data.preprocess.pipeline import run, summarize

__all__ = ["FIRST_VOCAB_ID", "MISSING_ID", "NO_LABEL", "OOV_ID", "PreprocessError", "Settings", "run", "summarize"]
