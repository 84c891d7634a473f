"""Prompt files: plain text, JSON or CSV, and the HPS v2 benchmark's style folders.

- `.txt` (or any other suffix): one prompt per line, blank lines skipped;
- `.json`: a list of strings, a list of objects with a "prompt" key, or an
  object mapping a style name to a list of prompts;
- `.csv`: a column named "prompt" (and an optional "style" column);
- a folder of `.json` files: each file is a style (the HPS v2 benchmark ships
  anime.json, concept-art.json, paintings.json and photo.json).

Every reader returns (prompts, styles) with one style (or None) per prompt.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rewardkit.errors import UserError


def read_prompts(path: str | Path) -> tuple[list[str], list[str | None]]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise UserError(f"prompt folder {path} holds no .json files (expected one per style, e.g. photo.json)")
        prompts, styles = [], []
        for f in files:
            p, _ = _read_json(f)
            prompts += p
            styles += [f.stem] * len(p)
        return prompts, styles
    if not path.is_file():
        raise UserError(f"prompt file {path}: no such file")
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise UserError(f"prompt file {path} is empty")
    return prompts, [None] * len(prompts)


def _read_json(path: Path) -> tuple[list[str], list[str | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file {path}: not valid JSON: {exc}") from None
    if isinstance(data, dict):
        prompts, styles = [], []
        for style, items in data.items():
            p = _json_list(path, items)
            prompts += p
            styles += [style] * len(p)
        return prompts, styles
    prompts = _json_list(path, data)
    return prompts, [None] * len(prompts)


def _json_list(path: Path, items) -> list[str]:
    if not isinstance(items, list):
        raise UserError(f"prompt file {path}: expected a list of prompts, found {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = item["prompt"]
        if not isinstance(item, str):
            raise UserError(f"prompt file {path}: item {i} is neither a string nor an object with a \"prompt\" string")
        out.append(item)
    return out


def _read_csv(path: Path) -> tuple[list[str], list[str | None]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise UserError(f"prompt file {path}: no 'prompt' column (columns: {', '.join(reader.fieldnames or [])})")
        rows = list(reader)
    return [r["prompt"] for r in rows], [r.get("style") or None for r in rows]
