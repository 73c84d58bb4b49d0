"""One error hierarchy; the CLI turns each into a message and an exit code."""

from __future__ import annotations

from dataclasses import dataclass


class BatchError(Exception):
    """Base of every error wsbatch raises on purpose."""

    exit_code = 1


class UsageError(BatchError):
    """Bad flags, settings or environment: nothing was sent."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation problem, located as FILE:LINE: field: reason."""

    source: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.field}: {self.reason}"


class ManifestError(BatchError):
    """The manifest has one or more problems; all of them are listed."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class LockedError(BatchError):
    """Another run holds the output directory."""

    exit_code = 3


class AuthError(BatchError):
    """The key was refused or the account cannot run tasks: stop the run."""

    exit_code = 4


class ApiError(BatchError):
    """One request to the API failed.

    ``retryable`` says whether the same request may be sent again;
    ``outcome_unknown`` says a submit may have created a task anyway.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        retryable: bool,
        outcome_unknown: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable
        self.outcome_unknown = outcome_unknown
        self.retry_after = retry_after

    @property
    def cause(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return "connection"


class PredictionGone(ApiError):
    """The server no longer knows a prediction id (404 or status deleted)."""

    def __init__(self, prediction_id: str) -> None:
        super().__init__(f"prediction {prediction_id} is unknown to the server", retryable=True)


class TaskFailed(BatchError):
    """The server ran the task and it ended in a failure status."""

    def __init__(self, status: str, message: str, code: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    @property
    def retryable(self) -> bool:
        # 5xxx task codes are the vendor's transient failures; everything else
        # (1xxx, or a failure without code) would fail the same way again.
        return self.code is not None and 5000 <= self.code < 6000


class OutputError(BatchError):
    """An output could not be fetched or is not what the task promised."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
