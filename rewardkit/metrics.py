"""metrics.jsonl: one JSON object per step, appended and flushed as it goes.

On resume the file is cut back to the checkpoint's step, so the curves of a
resumed run are those of an uninterrupted one (a line half-written by a kill
is dropped with the rest).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rewardkit.rundir import write_text_atomic


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Keep only complete lines with `step` <= step (atomically rewritten)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record.get("step", math.inf) > step:
                break
            kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
