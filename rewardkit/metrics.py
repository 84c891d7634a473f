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
import logging
import math
import os
from pathlib import Path

from rewardkit.durable import WRITE_ERRORS, failure, write_text_atomic
from rewardkit.errors import WriteFailed

log = logging.getLogger("rewardkit")


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
        line, end = json.dumps(record, allow_nan=True) + "\n", None
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
            try:
                os.truncate(self.path, end)
            except OSError:  # nothing more can be done here; a resume drops a torn last line anyway
                pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a last line torn by a kill is left out)."""
    return [record for _, record in _complete_lines(Path(path))]


def _complete_lines(path: Path):
    """(line, record) up to the first line that is not a whole JSON object ending in a newline: a last line
    torn by a kill is dropped quietly; a bad line before others is a damaged file, reported."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if i < len(lines) - 1:
                log.warning("%s: line %d is not a metrics record; it and the %d lines after it are left out", path, i + 1, len(lines) - i - 1)
            return
        yield line, record
