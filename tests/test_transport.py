"""classify(): the one table from an HTTP answer to what a caller may do next."""

from __future__ import annotations

import json

import pytest

from batch.errors import ApiError, AuthError
from batch.ledger import read_ledger
from batch.transport import classify

OK = {"code": 200, "message": "success", "data": {"id": "p1", "status": "created"}}


@pytest.mark.parametrize(
    ("status", "payload", "kind", "retryable", "unknown"),
    [
        (200, OK, None, None, None),
        (202, OK, None, None, None),  # an answer with an id is a task, whatever the status
        # A sync submit that timed out still names its task: poll it, never resend.
        (200, {"code": 5004, "message": "Sync mode timed out", "data": {"id": "p"}}, None,
         None, None),
        (200, "<html>busy</html>", ApiError, True, True),
        (200, {"code": 200, "data": None}, ApiError, True, True),
        (202, {}, ApiError, True, True),
        (200, {"code": 5000, "message": "internal"}, ApiError, True, True),
        (200, {"code": 429, "message": "slow down"}, ApiError, True, False),
        (200, {"code": 1401, "message": "invalid parameter"}, ApiError, False, False),
        (200, {"code": 400, "message": "bad"}, ApiError, False, False),
        (302, {}, ApiError, False, True),
        (400, {"code": 400, "message": "bad"}, ApiError, False, False),
        (401, {}, AuthError, None, None),
        (403, {"message": "suspended"}, AuthError, None, None),
        (400, {"message": "Insufficient balance"}, AuthError, None, None),
        (429, {}, ApiError, True, False),
        (500, {}, ApiError, True, True),
        (502, {}, ApiError, True, True),
        (503, {}, ApiError, True, False),
        (504, {}, ApiError, True, True),
    ],
)  # fmt: skip
def test_classify_tells_refused_from_maybe_created(status, payload, kind, retryable, unknown):
    """Every answer maps to success, a refusal (nothing created) or an unknown outcome."""
    error = classify(status, payload, None, "submit")
    if kind is None:
        assert error is None
        return
    assert isinstance(error, kind)
    if isinstance(error, ApiError):
        assert error.retryable is retryable and error.outcome_unknown is unknown


def test_classify_honours_retry_after():
    """A 429's Retry-After reaches the caller in seconds."""
    error = classify(429, {}, "3", "submit")
    assert isinstance(error, ApiError) and error.retry_after == 3.0


def test_schema_1_failed_lines_keep_their_possible_duplicates(tmp_path):
    """Lost answers that old ledgers recorded on a failed line still count as spend."""
    lines = [
        {"ts": "t", "event": "run", "price": 0.05},
        {"ts": "t", "event": "failed", "row": "a", "prediction_id": None, "retryable": True,
         "possible_duplicates": 3},
    ]  # fmt: skip
    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    state, _ = read_ledger(path)
    assert state.possible_duplicates == 3
    assert state.spend == pytest.approx(0.15)
