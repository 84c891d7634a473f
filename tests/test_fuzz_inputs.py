"""Property: whatever a recipe or prompt file holds, `validate` and `run` exit 0 or 2, never with a traceback.

Mutations of valid inputs (byte flips, insertions, deletions, truncation; random values under valid keys;
random bytes as a prompt file), drawn by hypothesis with a fixed seed (derandomize: the same examples on every
clone, so the suite cannot pass once and fail the next time) and a bounded count so the whole file takes seconds.
"""

from __future__ import annotations

import itertools
import math

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import pixels_recipe
from rewardkit.cli import main

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_runs = itertools.count()


def exit_code(*args: str) -> int:
    """`rewardkit ARGS` in this process; an exception escaping main() (a traceback for the user) fails the test."""
    try:
        return main(list(args))
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def base_recipe(run_dir, **sections) -> dict:
    return pixels_recipe(run_dir, steps=2, run={"sample_every": 0, "checkpoint_every": 0}, **sections)


def flatten(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out += flatten(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)]
    return out


def set_key(d: dict, key: tuple, value) -> dict:
    node = d
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    return d


byte_edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.floats(0, 1), st.integers(0, 255)),
                      min_size=1, max_size=6)


def mutate(data: bytes, edits) -> bytes:
    for op, where, byte in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data = data[:i] + bytes([data[i] ^ (byte or 1)]) + data[i + 1 :]
        elif op == "insert":
            data = data[:i] + bytes([byte]) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + 1 :]
        else:
            data = data[:i]
    return data


# values a recipe key could be given: wrong types, out of range, non-finite, nested
any_value = st.one_of(
    st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.booleans(),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(-3, 3), max_size=2),
)
# the same, small enough that a run which passes validation finishes in well under a second
small_value = st.one_of(
    st.integers(-3, 4), st.floats(-2, 2), st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=8), st.booleans(),
    st.lists(st.one_of(st.integers(-3, 3), st.floats(-1, 1)), max_size=4),
)


@settings(max_examples=150, **SETTINGS)
@given(edits=byte_edits)
def test_validate_survives_any_byte_mutation_of_a_recipe(tmp_path, edits):
    path = tmp_path / "recipe.toml"
    path.write_bytes(mutate(tomli_w.dumps(base_recipe(tmp_path / "run")).encode(), edits))
    assert exit_code("validate", str(path)) in (0, 2)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_validate_survives_any_value_under_a_valid_key(tmp_path, data):
    recipe = base_recipe(tmp_path / "run", eval={"prompts": ["a red square"], "rewards": {"color": {}}},
                         regularizers={"weight_l2": {"weight": 0.01}})
    key = data.draw(st.sampled_from(flatten(recipe)))
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(set_key(recipe, key, data.draw(any_value))))
    assert exit_code("validate", str(path)) in (0, 2)


@settings(max_examples=60, **SETTINGS)
@given(name=st.sampled_from(["p.txt", "p.csv", "p.json"]), edits=byte_edits, raw=st.none() | st.binary(max_size=64))
def test_validate_survives_any_prompt_file(tmp_path, name, edits, raw):
    valid = {"p.txt": b"a red square\na blue square\n", "p.csv": b"prompt,style\na red square,photo\n",
             "p.json": b'{"photo": ["a red square", {"prompt": "a blue square"}]}'}[name]
    (tmp_path / name).write_bytes(raw if raw is not None else mutate(valid, edits))
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(base_recipe(tmp_path / "run", prompts={"file": name})))
    assert exit_code("validate", str(path)) in (0, 2)


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_run_survives_any_small_value_under_a_valid_key(tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)  # a mutated run.dir is relative to here
    recipe = base_recipe(tmp_path / f"run{next(_runs)}")
    key = data.draw(st.sampled_from([k for k in flatten(recipe) if k != ("run", "dir")]))  # never a run outside tmp_path
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(set_key(recipe, key, data.draw(small_value))))
    assert exit_code("run", str(path)) in (0, 2)
