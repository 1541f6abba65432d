"""Coverage-guided fuzzing of the relay's frame scanner (atheris / libFuzzer).

    python tests/fuzz/fuzz_frames.py [libFuzzer flags] [CORPUS_DIR ...]

``make fuzz`` runs it for a bounded time (``-max_total_time``) over the seeds in
``tests/fuzz/corpus/frames``. See :mod:`tests.fuzz.targets` for the input
layout and the invariants checked. A crash is saved by libFuzzer as
``crash-<sha1>``: copy it into ``tests/fuzz/regressions/frames/`` and
``test_corpus.py`` replays it in every ``make test`` from then on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["wsgate", "wsproto", "tests"]):
    from tests.fuzz.targets import check_frames


def main() -> None:
    atheris.Setup(sys.argv, check_frames)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
