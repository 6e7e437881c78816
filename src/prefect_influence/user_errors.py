"""Errors told to people: which exceptions a person caused and can fix (bad configuration,
data, checkpoint, an output holding another job, a lease held by another run), in one line
each with a hint where one helps. Used by the command line and by the flow's logs, so a
deployment run says the same as the terminal. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import (
    ConfigMismatchError,
    InfluenceInputError,
    LeaseHeldError,
    PrefectInfluenceError,
    StorageError,
)

__all__ = ["UserError", "explain", "PREFIX"]

PREFIX = "prefect-influence: error: "


@dataclass(frozen=True)
class UserError:
    """What to print: the message (one line), a hint or ``None``, and the exit status (2 for
    bad input, 1 for a run that failed)."""

    message: str
    hint: Optional[str]
    status: int

    def lines(self) -> list[str]:
        return [PREFIX + self.message] + ([f"  hint: {self.hint}"] if self.hint else [])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _validation_message(exc) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "configuration"
        got = error.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict) and got is not None else ""
        parts.append(f"{where}: {error.get('msg')}{shown}")
    return "invalid configuration: " + "; ".join(parts)


def explain(exc: BaseException, started: bool = False) -> Optional[UserError]:
    """The person-facing form of ``exc``, or ``None`` for a bug (show its traceback).
    ``started``: the run had begun (a storage failure then fails the run, status 1)."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a dependency
        ValidationError = ()  # type: ignore[assignment]
    if isinstance(exc, ValidationError):
        return UserError(
            _one_line(_validation_message(exc)),
            "see docs/pipeline.md for every configuration field and its range",
            2,
        )
    if isinstance(exc, ConfigMismatchError):
        return UserError(
            _one_line(exc),
            "choose another output (--output), or replace the stored results (--overwrite)",
            2,
        )
    if isinstance(exc, LeaseHeldError):
        return UserError(_one_line(exc), None, 2)
    if isinstance(exc, InfluenceInputError):
        return UserError(_one_line(exc), None, 2)
    if isinstance(exc, StorageError):
        return UserError(_one_line(exc), None, 1 if started else 2)
    if isinstance(exc, PrefectInfluenceError):
        return UserError(_one_line(exc), None, 1)
    return None
