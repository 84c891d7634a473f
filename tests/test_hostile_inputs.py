"""Inputs real users produce (spreadsheet exports, files in the wrong encoding, outputs that are files, counts
of zero): each exits 2 with a message naming the file, line or argument, never with a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import pixels_recipe
from rewardkit.cli import main
from rewardkit.prompts import read_prompts


def cli(capsys, *args: str) -> tuple[int, str]:
    """`rewardkit ARGS` in this process: (exit code, stderr); argparse's own errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def trained(tmp_path, write_recipe, capsys):
    run_dir = tmp_path / "run"
    assert cli(capsys, "run", str(write_recipe(pixels_recipe(run_dir, steps=2))))[0] == 0
    return run_dir


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("content, expected", [
    (b"[run]\nsteps = " + b"[" * 5000, "nested too deeply"),  # tomllib recurses: RecursionError, not TOMLDecodeError
    (b"[run]\nsteps = 3\ndir = '\xe9t\xe9'\n", "line 3 is not UTF-8 (byte 0xe9)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10", "line 1 is not UTF-8 (byte 0x89)"),
    (b"[run]\x00steps = 3\n", "line 1 holds a NUL byte"),
    (b"[run\n", "not valid TOML"),
])
def test_a_recipe_the_parser_cannot_read_exits_2(tmp_path, capsys, content, expected):
    path = tmp_path / "recipe.toml"
    path.write_bytes(content)
    code, err = cli(capsys, "validate", str(path))
    assert code == 2 and expected in err and str(path) in err, err


def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path, write_recipe, capsys):
    path = write_recipe(pixels_recipe(tmp_path / "run", steps=2))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, err = cli(capsys, "validate", str(path))
    assert code == 0, err


def test_an_override_nested_too_deeply_is_a_string_then_refused(tmp_path, write_recipe, capsys):
    path = write_recipe(pixels_recipe(tmp_path / "run", steps=2))
    code, err = cli(capsys, "validate", str(path), "run.steps=" + "[" * 5000)
    assert code == 2 and "run.steps" in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_where_a_number_is_meant(tmp_path, write_recipe, capsys, value):
    path = write_recipe(pixels_recipe(tmp_path / "run", steps=2))
    for key in ("optimizer.lr", "rewards.color.weight"):
        code, err = cli(capsys, "validate", str(path), f"{key}={value}")
        assert code == 2 and key in err, (key, err)


def test_overrides_may_follow_options(tmp_path, write_recipe, capsys):
    path = write_recipe(pixels_recipe(tmp_path / "run", steps=2))
    assert cli(capsys, "run", str(path))[0] == 0
    code, err = cli(capsys, "run", str(path), "--resume", "run.steps=3")
    assert code == 0, err
    code, err = cli(capsys, "run", str(path), "--resume", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


# ----------------------------------------------------------------------------- prompt files
def test_prompt_files_with_a_byte_order_mark_keep_it_out_of_the_first_prompt_and_column(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa cat\r\n\r\n  \r\na dog\r\n".encode())
    assert read_prompts(txt) == (["a cat", "a dog"], [None, None])
    csv = tmp_path / "p.csv"
    csv.write_bytes("\ufeffprompt,style\r\na cat,photo\r\n,\r\n,anime\r\na dog,\r\n".encode())  # as spreadsheets save it
    assert read_prompts(csv) == (["a cat", "a dog"], ["photo", None])
    js = tmp_path / "p.json"
    js.write_bytes("\ufeff".encode() + json.dumps(["a cat", "", "a dog"]).encode())
    assert read_prompts(js) == (["a cat", "a dog"], [None, None])


@pytest.mark.parametrize("name, content, expected", [
    ("p.txt", "a cat\ncafé crème\n".encode("cp1252"), "line 2 is not UTF-8 (byte 0xe9); charset-normalizer's guess for the file: "),
    ("p.txt", b"\xef\xbb\xbfa cat\nca\xe9fe\n", "line 2 is not UTF-8 (byte 0xe9)"),  # counted after the byte-order mark
    ("p.txt", "a cat\na dog\n".encode("utf-16"), "line 1 is not UTF-8 (byte 0xff); charset-normalizer's guess for the file: utf_16."),
    ("p.csv", "prompt\na cat\nna\xefve\n".encode("latin-1"), "line 3 is not UTF-8 (byte 0xef)"),
    ("p.txt", bytes(range(256)) * 4, "line 2 is not UTF-8 (byte 0x80); it is not text at all"),
    ("p.txt", b"a cat\na\x00dog\n", "line 2 holds a NUL byte: a binary file, or UTF-16 without a byte-order mark?"),
    ("p.csv", b"text,style\na cat,photo\n", "no 'prompt' column (columns: text, style)"),
    ("p.csv", b"\n\n", "no 'prompt' column"),
    ("p.txt", b"\n \n\t\n", "holds no prompts"),
    ("p.json", b"[" * 100000, "nested too deeply"),
    ("p.json", b'{"photo": "a cat"}', "expected a list of prompts, found str"),
])
def test_a_prompt_file_that_is_not_prompts_exits_2_naming_it(tmp_path, write_recipe, capsys, name, content, expected):
    (tmp_path / name).write_bytes(content)
    recipe = pixels_recipe(tmp_path / "run", steps=2, prompts={"file": name})
    code, err = cli(capsys, "validate", str(write_recipe(recipe)))
    assert code == 2 and expected in err and f"prompts.file: prompt file {tmp_path / name}" in err, err


# ----------------------------------------------------------------------------- outputs and counts
def test_an_output_that_is_a_file_or_cannot_be_written_exits_2_before_any_work(tmp_path, trained, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    sample = ["sample", str(trained), "--prompt", "a red square"]
    for out, expected in ((a_file, "--out {} is a file, not a folder"), (a_file / "sub", "--out {} cannot be written"),
                          (tmp_path / "empty_ok", None)):
        code, err = cli(capsys, *sample, "--out", str(out))
        assert (code, expected and expected.format(out) in err) == ((0, None) if expected is None else (2, True)), err
    code, err = cli(capsys, "export", str(trained), "--format", "lora", "--out", str(a_file))
    assert code == 2 and f"--out {a_file} is a file" in err, err
    code, err = cli(capsys, "eval", str(trained), "--prompts", str(a_file), "--metrics", "color", "--out", str(a_file))
    assert code == 2 and f"--out {a_file} is a file" in err, err
    code, err = cli(capsys, "eval", "--reference", str(tmp_path), "--save-reference-stats", str(a_file / "s.safetensors"))
    assert code == 2 and f"--save-reference-stats's folder {a_file} is a file, not a folder" in err, err
    code, err = cli(capsys, "train-hires", str(tmp_path), "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path} is a folder" in err, err
    code, err = cli(capsys, "train-hires", str(tmp_path), "--out", str(a_file / "sub" / "c.safetensors"))
    assert code == 2 and f"--out's folder {a_file / 'sub'} cannot be written" in err, err


@pytest.mark.parametrize("args, expected", [
    (["sample", "RUN", "--prompt", "x", "--out", "OUT", "-n", "0"], "argument -n: must be at least 1, got 0"),
    (["sample", "RUN", "--prompt", "x", "--out", "OUT", "-n", "-3"], "argument -n: must be at least 1, got -3"),
    (["sample", "RUN", "--prompt", "x", "--out", "OUT", "-n", "two"], "argument -n: expected a whole number, got 'two'"),
    (["eval", "RUN", "--prompts", "P", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["eval", "RUN", "--prompts", "P", "--steps", "-1"], "argument --steps: must be at least 1, got -1"),
    (["eval", "RUN", "--prompts", "P", "--fid-dims", "100"], "argument --fid-dims: invalid choice: 100"),
    (["train-hires", "F", "--out", "o.safetensors", "--lr", "nan"], "argument --lr: must be a finite number above 0, got nan"),
    (["train-hires", "F", "--out", "o.safetensors", "--min-factor", "0.5"], "argument --min-factor: must be a finite number above 1"),
    (["train-hires", "F", "--out", "o.safetensors", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["run", "--num-processes", "0"], "argument --num-processes: must be at least 1, got 0"),
])
def test_counts_that_make_no_sense_exit_2_naming_the_argument(tmp_path, trained, capsys, args, expected):
    args = [str(trained) if a == "RUN" else str(tmp_path / a) if a in ("OUT", "P", "F") else a for a in args]
    code, err = cli(capsys, *args)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "OUT").exists()
