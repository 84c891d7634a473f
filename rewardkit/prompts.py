"""Prompt files: plain text, JSON or CSV, and the HPS v2 benchmark's style folders.

- `.txt` (or any other suffix): one prompt per line;
- `.json`: a list of strings, a list of objects with a "prompt" key, or an
  object mapping a style name to a list of prompts;
- `.csv`: a column named "prompt" (and an optional "style" column);
- a folder of `.json` files: each file is a style (the HPS v2 benchmark ships
  anime.json, concept-art.json, paintings.json and photo.json).

Files are UTF-8; a byte-order mark (what spreadsheet programs write) is
accepted and dropped. Prompts are stripped of surrounding whitespace and
empty ones are skipped (blank lines, empty CSV cells). A file that is not
UTF-8 text is refused with the line and the encoding it looks like.

Every reader returns (prompts, styles) with one style (or None) per prompt.
"""

from __future__ import annotations

import codecs
import csv
import io
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
        return _nonempty(path, prompts, styles)
    if not path.is_file():
        raise UserError(f"prompt file {path}: no such file")
    if path.suffix == ".json":
        return _nonempty(path, *_read_json(path))
    if path.suffix == ".csv":
        return _nonempty(path, *_read_csv(path))
    prompts = [line.strip() for line in read_text(path).splitlines()]
    return _nonempty(path, prompts, [None] * len(prompts))


def read_text(path: Path, what: str = "prompt file") -> str:
    """A UTF-8 text file's content (a byte-order mark dropped); UserError naming the line and the encoding
    the file looks like when it is not UTF-8 text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{what} {path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); {_looks_like(data)}") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserError(f"{what} {path}: line {line} holds a NUL byte: a binary file, or UTF-16 without a byte-order mark? "
                        "Save it as UTF-8 text") from None
    return text


def _looks_like(data: bytes) -> str:
    """What the file seems to be, for the message: charset-normalizer's guess at its encoding. On a few lines
    of Western text the 8-bit code pages are look-alikes it cannot tell apart (it often names cp1250 for
    cp1252 text, which maps the same bytes to other letters), so for those the usual suspects are named too."""
    from charset_normalizer import from_bytes

    best = from_bytes(data[:1_000_000]).best()
    if best is None:
        return "it is not text at all (a binary file?)"
    guess = f"charset-normalizer's guess for the file: {best.encoding}"
    if best.encoding.startswith(("cp12", "cp10", "latin", "iso8859", "mac_")):
        guess += " (a legacy 8-bit code page; Western European text is most often cp1252 or latin-1)"
    return f"{guess}. Save it as UTF-8 (a spreadsheet's 'CSV UTF-8'; or iconv -f ENCODING -t utf-8)"


def _nonempty(path: Path, prompts: list[str], styles: list) -> tuple[list[str], list[str | None]]:
    kept = [(p.strip(), s) for p, s in zip(prompts, styles) if p.strip()]
    if not kept:
        raise UserError(f"prompt file {path} holds no prompts")
    return [p for p, _ in kept], [s for _, s in kept]


def _read_json(path: Path) -> tuple[list[str], list[str | None]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file {path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise UserError(f"prompt file {path}: nested too deeply to be a prompt list") from None
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
    try:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise UserError(f"prompt file {path}: no 'prompt' column (columns: {', '.join(reader.fieldnames or [])})")
        rows = list(reader)
    except csv.Error as exc:
        raise UserError(f"prompt file {path}: not a valid CSV file (line {reader.line_num}: {exc})") from None
    return [r["prompt"] or "" for r in rows], [r.get("style") or None for r in rows]
