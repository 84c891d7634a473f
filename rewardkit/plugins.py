"""Finding and registering plugins.

Three sources, all through the hooks of rewardkit.hookspecs:
1. the default plugin modules (DEFAULT_PLUGINS: the built-in generators,
   rewards and regularizers, and the digits testbed), always;
2. installed packages exposing the `rewardkit` entry-point group, filtered
   by REWARDKIT_LOAD_PLUGINS (a comma list of entry-point or distribution
   names; set but empty loads none);
3. local files given explicitly (`--plugin path.py`).

A plugin that fails to import or to register is recorded with its error,
warned about, and skipped; everything else keeps working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pluggy

from rewardkit import hookspecs
from rewardkit.errors import UserError, did_you_mean

ENTRY_POINT_GROUP = "rewardkit"
LOAD_ENV = "REWARDKIT_LOAD_PLUGINS"
KINDS = {"generator": "register_generators", "reward": "register_rewards", "regularizer": "register_regularizers"}
HOOKS = {**KINDS, "command": "register_commands"}
"""The registering hook of each kind of thing a plugin provides."""
CORE_COMMANDS = ("run", "validate", "plugins", "sample", "export", "eval", "train-hires", "serve-reward", "report")
"""The commands of rewardkit/cli.py, which a plugin cannot replace."""
DEFAULT_PLUGINS = ("rewardkit.generators", "rewardkit.rewards", "rewardkit.regularizers", "rewardkit.testbed")
"""The built-ins: modules registered through the same hooks as third-party plugins, before them."""

log = logging.getLogger("rewardkit")


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type
    package: str
    version: str

    @property
    def summary(self) -> str:
        """The first line of the class's docstring (else its module's), without a leading "`name`: ", capitalized."""
        doc = (self.cls.__doc__ or "").strip() or (sys.modules[self.cls.__module__].__doc__ or "").strip()
        line = doc.splitlines()[0] if doc else ""
        prefix = f"`{self.name}`: "
        line = line[len(prefix):] if line.startswith(prefix) else line
        return line[:1].upper() + line[1:]


@dataclass(frozen=True)
class Command:
    """A `rewardkit` subcommand registered by a plugin (hookspecs.register_commands)."""

    name: str
    run: Callable
    arguments: Callable | None
    help: str
    package: str
    version: str


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    package: str
    error: str


@dataclass(frozen=True)
class _Origin:
    package: str
    version: str


class Registry:
    """Every registered generator, reward and regularizer class, by kind and name."""

    def __init__(self):
        self.plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        self.commands: dict[str, Command] = {}
        self.failures: list[PluginFailure] = []
        self.hook = None
        """pluggy's hook caller: the notification hooks (e.g. `registry.hook.run_finished(...)`)."""

    def get(self, kind: str, name: str) -> type:
        table = self.plugins[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise UserError(f"no {kind} plugin named '{name}'{did_you_mean(name, table)}; registered: {known}")
        return table[name].cls

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for info in sorted(self.plugins[kind].values(), key=lambda i: i.name)]

    def _fail(self, plugin: str, package: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.failures.append(PluginFailure(plugin, package, text))
        log.warning("plugin '%s' (%s) could not be loaded and is skipped: %s", plugin, package, text)


def load_registry(local_files: Iterable[str | os.PathLike] = ()) -> Registry:
    """Build a registry from the default plugin modules, installed plugins and `local_files`."""
    registry = Registry()
    pm, origins = _plugin_manager(registry, local_files, installed=True)
    _call_register_hooks(registry, pm, origins, list(HOOKS))
    return registry


def load_commands(installed: bool, local_files: Iterable[str | os.PathLike] = ()) -> dict[str, Command]:
    """The plugins' subcommands, without loading any generator, reward or regularizer class: those of the
    default plugin modules, and with `installed` those of installed packages (which may import torch) and
    of `local_files` too."""
    registry = Registry()
    pm, origins = _plugin_manager(registry, local_files if installed else (), installed=installed)
    _call_register_hooks(registry, pm, origins, ["command"])
    return registry.commands


def _plugin_manager(registry: Registry, local_files, installed: bool):
    from rewardkit import __version__

    pm = pluggy.PluginManager("rewardkit")
    pm.add_hookspecs(hookspecs)
    registry.hook = pm.hook
    origins: dict[str, _Origin] = {}

    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
        origins[name] = _Origin("rewardkit", __version__)

    for ep in _selected_entry_points() if installed else []:
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            module = ep.load()
            pm.register(module, name=f"ep:{ep.name}")
        except Exception as exc:  # any failure of third-party code is reported, not fatal
            registry._fail(ep.name, dist, exc)
            continue
        origins[f"ep:{ep.name}"] = _Origin(dist, version)

    for path in local_files:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--plugin {path}: no such file")
        try:
            module = _import_file(path)
            pm.register(module, name=f"file:{path}")
        except Exception as exc:
            registry._fail(path.stem, str(path), exc)
            continue
        origins[f"file:{path}"] = _Origin(str(path), "local")
    return pm, origins


def _call_register_hooks(registry: Registry, pm, origins: dict, kinds: list[str]) -> None:
    for kind in kinds:
        for impl in getattr(pm.hook, HOOKS[kind]).get_hookimpls():
            origin = origins[impl.plugin_name]
            register = _command_registrar(registry, origin) if kind == "command" else _registrar(registry, kind, origin)
            try:
                impl.function(register=register)
            except Exception as exc:
                registry._fail(impl.plugin_name.split(":", 1)[-1], origin.package, exc)


def _command_registrar(registry: Registry, origin: _Origin):
    def register(name: str, run: Callable, arguments: Callable | None = None, help: str = ""):
        if name in CORE_COMMANDS:
            registry._fail(name, origin.package, f"command '{name}' is one of rewardkit's own commands")
            return
        existing = registry.commands.get(name)
        if existing is not None and existing.run is not run:
            registry._fail(name, origin.package, f"command '{name}' is already registered by {existing.package}")
            return
        registry.commands[name] = Command(name, run, arguments, help, origin.package, origin.version)

    return register


def _registrar(registry: Registry, kind: str, origin: _Origin):
    def register(cls):
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__qualname__} has no `name`")
        existing = registry.plugins[kind].get(name)
        if existing is not None and existing.cls is not cls:
            registry._fail(name, origin.package, f"{kind} name '{name}' is already registered by {existing.package}")
            return
        registry.plugins[kind][name] = PluginInfo(kind, name, cls, origin.package, origin.version)

    return register


def _selected_entry_points():
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    wanted = os.environ.get(LOAD_ENV)
    if wanted is None:
        return list(eps)
    names = {_normalize(w) for w in wanted.split(",") if w.strip()}
    selected = [ep for ep in eps if _normalize(ep.name) in names or (ep.dist and _normalize(ep.dist.name) in names)]
    found = {_normalize(ep.name) for ep in eps} | {_normalize(ep.dist.name) for ep in eps if ep.dist}
    for name in sorted(names - found):
        log.warning("%s names '%s', which is no installed rewardkit plugin (installed: %s)", LOAD_ENV, name, ", ".join(sorted(found)) or "none")
    return selected


def _normalize(name: str) -> str:
    """Distribution names compare as pip does: case and -_. runs do not matter."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _import_file(path: Path):
    module_name = f"rewardkit_local_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
