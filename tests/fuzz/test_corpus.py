"""Every fuzzing corpus input and crash regression, replayed through the fuzz targets.

``make fuzz`` grows the coverage; this keeps what it found (and the seeds) checked
in every ``make test``, with or without atheris installed. A crash found by the
fuzzer goes into ``regressions/<target>/`` under a name saying what it was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .targets import check_frames, check_handshake

HERE = Path(__file__).resolve().parent
CHECKS: dict[str, Callable[[bytes], None]] = {
    "frames": check_frames,
    "handshake": check_handshake,
}


def _inputs(kind: str) -> list[Path]:
    return sorted(
        path
        for root in (HERE / "corpus" / kind, HERE / "regressions" / kind)
        if root.is_dir()
        for path in root.iterdir()
        if path.is_file() and not path.name.startswith(".")
    )


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_corpus_and_regressions_pass(kind: str) -> None:
    inputs = _inputs(kind)
    assert len(inputs) >= 10, "the seed corpus is missing (python -m tests.fuzz.make_corpus)"
    failures = []
    for path in inputs:
        try:
            CHECKS[kind](path.read_bytes())
        except Exception as exc:  # report every failing input, not just the first
            failures.append(f"{path.relative_to(HERE)}: {exc!r}")
    assert not failures, "\n".join(failures)
