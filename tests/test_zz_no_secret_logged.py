"""Runs last: no secret the suite handed the gateway appeared in any log record.

conftest.py scans every structlog record of the whole run (captured ones too)
for the strings registered in ``helpers.SUITE_SECRETS``.
"""

from __future__ import annotations

import pytest

from . import helpers


def test_no_registered_secret_was_logged() -> None:
    assert helpers.SUITE_SECRETS, "no test registered its secrets"
    if helpers.SCANNED[0] < 100:
        pytest.skip("meaningful only after the rest of the suite has logged")
    assert helpers.LEAKS == []
