"""Coverage-guided fuzzing of the opening-handshake parser (atheris / libFuzzer).

    python tests/fuzz/fuzz_handshake.py [libFuzzer flags] [CORPUS_DIR ...]

``make fuzz`` runs it for a bounded time (``-max_total_time``) over the seeds in
``tests/fuzz/corpus/handshake``. See :mod:`tests.fuzz.targets` for the input
layout and the invariants checked. A crash is saved by libFuzzer as
``crash-<sha1>``: copy it into ``tests/fuzz/regressions/handshake/`` and
``test_corpus.py`` replays it in every ``make test`` from then on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["wsgate", "h11", "tests"]):
    from tests.fuzz.targets import check_handshake


def main() -> None:
    atheris.Setup(sys.argv, check_handshake)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
