"""Errors that are the user's to fix.

Anything raised as a `UserError` is reported by the CLI as a short message with
exit code 2 and no traceback: a bad recipe, a bad argument, missing weights.
A `WriteFailed` (a full disk) or `TrainingDiverged` exits 1 with a message;
everything else is a bug and exits 1 with a traceback.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


class RecipeError(UserError):
    """A recipe (or an override of it) is invalid.

    `problems` holds one line per problem, each naming the dotted key.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid recipe {source}:\n{lines}")

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary (a worker pool)
        return type(self), (self.source, self.problems)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps produced NaN or Inf; the run stopped."""


class WriteFailed(Exception):
    """The machine refused a write (no space left, a file-size limit, an I/O error); what was written before
    is intact. The CLI reports it without a traceback (exit 1: not the input's fault)."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
