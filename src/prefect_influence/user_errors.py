"""Errors told to people: which exceptions a person caused and can fix (bad configuration,
data, checkpoint, an output holding another job, a lease held by another run), in one line
each with a hint where one helps. Used by the command line and by the flow's logs, so a
deployment run says the same as the terminal. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import ValidationError

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


def _validation_message(exc: ValidationError) -> str:
    """One clause per field: the alternatives of a union field (``'auto'`` or an integer) are
    joined, and pydantic's tags for them are left out of the field's path."""
    fields: dict[str, tuple[list[str], object]] = {}
    for error in exc.errors():
        path = [str(p) for p in error.get("loc", ()) if not _is_tag(p)]
        messages, _ = fields.setdefault(".".join(path) or "configuration", ([], error.get("input")))
        messages.append(error.get("msg", "invalid"))
    parts = []
    for where, (messages, got) in fields.items():
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        parts.append(f"{where}: {' or '.join(dict.fromkeys(messages))}{shown}")
    return "invalid configuration: " + "; ".join(parts)


def _is_tag(part) -> bool:
    """A union member's tag in an error's location (``literal['auto']``, ``constrained-int``,
    ``int``), not a field name."""
    return isinstance(part, str) and (
        not part.isidentifier() or part in ("int", "float", "str", "bool")
    )


def explain(exc: BaseException, started: bool = False) -> Optional[UserError]:
    """The person-facing form of ``exc``, or ``None`` for a bug (show its traceback).
    ``started``: the run had begun (a storage failure then fails the run, status 1)."""
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
    if isinstance(exc, (InfluenceInputError, LeaseHeldError)):
        return UserError(_one_line(exc), None, 2)
    if isinstance(exc, StorageError):
        return UserError(_one_line(exc), None, 1 if started else 2)
    if isinstance(exc, PrefectInfluenceError):
        return UserError(_one_line(exc), None, 1)
    return None
