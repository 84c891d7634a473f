"""metrics.jsonl: one JSON object per step, appended and flushed as it goes.

On resume the file is cut back to the checkpoint's step, so the curves of a
resumed run are those of an uninterrupted one (a line half-written by a kill
is dropped with the rest). A line the disk refuses (full, or over a file-size
limit) is cut off again before WriteFailed is raised: the file never ends in
a torn line that a later append would glue onto.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

from rewardkit.durable import WRITE_ERRORS, failure, write_text_atomic
from rewardkit.errors import WriteFailed


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Keep only complete lines with `step` <= step (atomically rewritten)."""
        if not self.path.exists():
            return
        kept = itertools.takewhile(lambda lr: lr[1].get("step", math.inf) <= step, _complete_lines(self.path))
        write_text_atomic(self.path, "".join(line for line, _ in kept))

    def write(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True) + "\n"
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            end = self._file.tell()
            self._file.write(line)
            self._file.flush()
        except WRITE_ERRORS as exc:
            self._cut_back(end if self._file is not None else None)
            raise WriteFailed(f"writing {self.path} failed: {failure(exc)}") from exc

    def _cut_back(self, end: int | None) -> None:
        """After a refused write: drop whatever part of the line reached the file (shrinking is always allowed)."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:  # the buffered rest is refused again: it is cut off below
                pass
        if end is not None:
            os.truncate(self.path, end)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a last line torn by a kill is left out)."""
    return [record for _, record in _complete_lines(Path(path))]


def _complete_lines(path: Path):
    """(line, record) up to the first line that is not a whole JSON object ending in a newline."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(record, dict):
            return
        yield line, record
