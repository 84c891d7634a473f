"""Option models shared by recipes and plugins, and readable validation errors.

Every plugin declares its options as a pydantic model subclassing
`PluginOptions` (unknown keys are errors, never silently ignored). Recipes and
the Python API validate through the same models, so an option means the same
thing wherever it is set.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from rewardkit.errors import RecipeError, did_you_mean


class PluginOptions(BaseModel):
    """Base of every plugin's `Options`: strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no option means anything at inf or NaN


def validate_strict(model: type[BaseModel], data):
    """Validate recipe data without coercion: "10" is not a number, "yes" is not a boolean.

    Goes through JSON so pydantic's strict mode still takes TOML arrays for
    tuples and integers for floats.
    """
    return model.model_validate_json(json.dumps(data, default=str), strict=True)


def describe_errors(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem: the dotted key, what was expected, what was found."""
    problems = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, err["loc"][:-1])
            allowed = list(parent.model_fields) if parent is not None else []
            hint = did_you_mean(loc[-1], allowed)
            expected = f"; allowed keys: {', '.join(allowed)}" if allowed and not hint else ""
            problems.append(f"{key}: unknown key{hint}{expected}")
        elif kind == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            found = err.get("input")
            msg = str(err["ctx"]["error"]) if kind == "value_error" else err["msg"]  # a validator's own words
            problems.append(f"{key}: {msg[0].lower()}{msg[1:]}; found {found!r}")
    return problems


def _model_at(model: type[BaseModel], loc) -> type[BaseModel] | None:
    """The nested pydantic model at `loc`, to list its keys in a hint."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validate_plugin_options(cls, options: dict, where: str, source: str | None = None) -> PluginOptions:
    """Validate `options` against `cls.Options` as strictly as a recipe is, raising RecipeError naming `where.key`."""
    try:
        return validate_strict(cls.Options, options)
    except ValidationError as exc:
        raise RecipeError(source or f"options of {cls.__name__}", describe_errors(exc, cls.Options, where)) from None


class Configurable:
    """Mixin for plugin classes: `name`, `Options`, and validated `self.options`."""

    name: str = ""
    Options: type[PluginOptions] = PluginOptions

    def _set_options(self, options: dict) -> None:
        self.options = validate_plugin_options(type(self), options, self.name or type(self).__name__)

    @classmethod
    def check(cls, options: PluginOptions, generator, where: str) -> list[str]:
        """Problems of this plugin's `options` with the rest of the recipe, one line each starting with `where`
        (its dotted key, e.g. 'regularizers.noise_norm'); [] when it fits.

        `generator` is the recipe's generator as a spec (`generator.cls`, `generator.options`), not built:
        ask it through its classmethods (e.g. `planned_steps`). Runs in `rewardkit validate` and when the
        Optimizer is constructed, before any model loads.
        """
        return []

    def recipe_table(self) -> dict:
        """This plugin as a recipe table: its registered name and its options."""
        return {"type": self.name, **self.options.model_dump(mode="json", exclude_none=True)}
