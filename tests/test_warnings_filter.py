"""recsys hides exactly the known third-party notices (by message and category or logger), and
RECSYS_WARNINGS=all shows them. The launch tests check a real 2-process run's output
(tests/launch/test_torchx_launch.py)."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator

import pytest

from recsys.cli import main
from recsys.warnings_filter import KNOWN, install

# What torch 2.13 / torchrec 1.8 print, verbatim.
EMITTED = {
    "broadcast_buffers": "`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead. IMPORTANT: unlike "
    "`broadcast_buffers=False`, `forward_sync_buffers=False` still syncs buffers at init.",
    "sharded_tensor": "Please use DTensor instead and we are deprecating ShardedTensor.",
    "single_process_load": "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
    "load in a single process.",
    "is_fx_tracing": "is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use "
    "is_fx_tracing_symbolic_tracing() for specifically fx.symbolic_trace or torch.compiler.is_compiling() for "
    "specifically torch.export/compile.",
}
WARNED = [k for k in KNOWN if not k.logger]
LOGGED = [k for k in KNOWN if k.logger]


@pytest.fixture
def clean() -> Iterator[None]:
    """Every warning shown and no log filter of recsys's (the CLI tests install them); puts this process's
    warning filters and loggers' filters back afterwards."""
    loggers = [logging.getLogger(k.logger) for k in LOGGED]
    before = [list(logger.filters) for logger in loggers]
    for logger in loggers:
        logger.filters[:] = [f for f in logger.filters if type(f).__name__ != "_DropKnown"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
    for logger, filters in zip(loggers, before):
        logger.filters[:] = filters


def shown(category: type[Warning], message: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(message, category, stacklevel=1)
    return bool(caught)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def logged(name: str, message: str) -> bool:
    """Whether a warning ``message`` of logger ``name`` gets past the logger's filters to its handlers."""
    logger, collect = logging.getLogger(name), _Collect()
    level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.WARNING)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    return message in collect.messages


def test_every_known_entry_matches_what_the_library_prints() -> None:
    for known in KNOWN:
        assert [m for m in EMITTED.values() if re.match(known.message, m)], known.message
    assert all(k.why for k in KNOWN)


def test_known_warnings_are_hidden_others_still_show(clean: None) -> None:
    assert all(shown(k.category, m) for k in WARNED for m in EMITTED.values() if re.match(k.message, m))
    assert install({}) is True
    for known in WARNED:
        (message,) = [m for m in EMITTED.values() if re.match(known.message, m)]
        assert not shown(known.category, message), message
        # the same text in another category is another warning
        other = DeprecationWarning if known.category is not DeprecationWarning else UserWarning
        assert shown(other, message), message
    # a different deprecation from the same libraries still shows
    assert shown(FutureWarning, "`find_unused_parameters` is deprecated. Use `static_graph` instead.")
    assert shown(UserWarning, "torch.distributed is disabled for this test")


def test_known_log_records_are_dropped_others_pass(clean: None) -> None:
    (known,) = LOGGED
    assert logged(known.logger, EMITTED["is_fx_tracing"])
    install({})
    install({})  # idempotent: one filter per logger
    assert sum(type(f).__name__ == "_DropKnown" for f in logging.getLogger(known.logger).filters) == 1
    assert not logged(known.logger, EMITTED["is_fx_tracing"])
    assert logged(known.logger, "symbolic_trace: something else went wrong")
    assert logged("torch.fx.other", EMITTED["is_fx_tracing"])  # only the logger that emits it


def test_recsys_warnings_all_shows_everything(clean: None) -> None:
    assert install({"RECSYS_WARNINGS": "all"}) is False
    assert shown(FutureWarning, EMITTED["sharded_tensor"])
    assert logged(LOGGED[0].logger, EMITTED["is_fx_tracing"])


def test_the_cli_installs_it_first(
    clean: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("RECSYS_WARNINGS", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert not shown(FutureWarning, EMITTED["broadcast_buffers"])
    warnings.resetwarnings()
    warnings.simplefilter("always")
    monkeypatch.setenv("RECSYS_WARNINGS", "all")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert shown(FutureWarning, EMITTED["broadcast_buffers"])


@pytest.mark.slow
def test_torchs_own_scripting_at_import_is_not_a_flood_but_scripting_still_warns() -> None:
    """torch.distributed.optim scripts 66 functions at import (66 DeprecationWarnings, most of a test run's
    warnings); recsys imports it quietly. A fresh interpreter: the import happens once per process."""
    import subprocess
    import sys

    from tests.helpers import child_env

    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import recsys.distributed.optimizers, torch\n"
        "    at_import = sum('torch.jit.script` is deprecated' in str(w.message) for w in caught)\n"
        "    torch.jit.script(torch.nn.Linear(2, 2))\n"
        "print(at_import, sum('torch.jit.script` is deprecated' in str(w.message) for w in caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "1"]
