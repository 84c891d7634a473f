"""The house's structure: no import circles, and the layers that keep it so.

The import graph is read from the source with `ast` - every import,
including those inside functions, since an import hidden in a function still
ties two files together. A module `from pkg import name` imports pkg.name
when that is a module, else pkg.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rewardkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The rewardkit modules `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_imports_inside_functions_and_finds_a_planted_circle():
    graph = import_graph()
    assert "rewardkit.recipe" in graph["rewardkit.rundir"]
    assert "rewardkit.evaluation" in graph["rewardkit.optimizer"]  # imported inside a method
    planted = {k: set(v) for k, v in graph.items()}
    planted["rewardkit.errors"].add("rewardkit.optimizer")
    assert any({"rewardkit.errors", "rewardkit.optimizer"} <= set(c) for c in circles(planted))


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "modules that import each other in a loop: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(
    "module, allowed",
    [
        ("rewardkit.images", {"rewardkit.durable", "rewardkit.errors"}),  # image helpers: torch, torchvision, atomic writes, input errors
        ("rewardkit.sampler", set()),  # the sampler knows nothing of pipelines
        ("rewardkit.errors", set()),
        ("rewardkit.durable", {"rewardkit.errors"}),
        ("rewardkit.checkpoint", {"rewardkit.durable", "rewardkit.errors"}),
        ("rewardkit.distributed", {"rewardkit.errors"}),
        ("rewardkit.recipe", {"rewardkit.errors", "rewardkit.options", "rewardkit.distributed", "rewardkit.prompts"}),
    ],
)
def test_low_layers_import_nothing_above_them(module, allowed):
    assert import_graph()[module] <= allowed


BASE = {"rewardkit", "rewardkit.errors", "rewardkit.options", "rewardkit.hookspecs", "rewardkit.lazy", "rewardkit.images", "rewardkit.sampler",
        "rewardkit.distributed", "rewardkit.checkpoint", "rewardkit.hub", "rewardkit.prompts", "rewardkit.durable", "rewardkit.policy_gradient"}


def plugin_layer(module: str) -> bool:
    """The built-in plugins: they may import the base layer and each other, nothing above (docs/design.md).
    (The testbed's hook module registers commands, which run its top-layer evaluation.)"""
    return module.startswith(("rewardkit.generators", "rewardkit.rewards", "rewardkit.regularizers")) or module in (
        "rewardkit.testbed.plugins", "rewardkit.testbed.data", "rewardkit.testbed.models")


def test_the_layers_of_the_module_map():
    graph = import_graph()
    above = {m: sorted(t for t in graph[m] if t not in BASE) for m in graph if m in BASE}
    assert not any(above.values()), f"base-layer modules import above the base layer: { {m: t for m, t in above.items() if t} }"
    above = {m: sorted(t for t in graph[m] if t not in BASE and not plugin_layer(t)) for m in graph if plugin_layer(m)}
    assert not any(above.values()), f"plugin-layer modules import above their layer: { {m: t for m, t in above.items() if t} }"


def test_the_core_does_not_import_the_testbed():
    """The digits demo is a default plugin module: the core reaches it only through the plugin hooks."""
    graph = import_graph()
    core = [m for m in graph if not m.startswith("rewardkit.testbed")]
    assert not [m for m in core if any(t.startswith("rewardkit.testbed") for t in graph[m])]


def test_docs_list_exactly_the_registered_built_ins(monkeypatch, capsys):
    from rewardkit.cli import main

    monkeypatch.setenv("REWARDKIT_LOAD_PLUGINS", "")  # the built-ins alone
    assert main(["plugins", "--markdown"]) == 0
    generated = capsys.readouterr().out
    text = (ROOT / "docs" / "plugins.md").read_text()
    block = text[text.index("<!-- plugins:start -->") + len("<!-- plugins:start -->") : text.index("<!-- plugins:end -->")]
    assert block.strip() == generated.strip(), "docs/plugins.md is stale: regenerate it with `REWARDKIT_LOAD_PLUGINS= rewardkit plugins --markdown`"
    for name in ("testbed", "noise_norm", "high_resolution", "testbed-report"):
        assert f"`{name}`" in block or f"`rewardkit {name}`" in block


def test_documents_cited_in_code_and_docs_exist():
    """Docstrings, recipes and docs cite docs/*.md files and relative links that are in the repository."""
    import re

    cited = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "recipes").glob("*.toml"), *(ROOT / "plugins").rglob("*.py"), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]:
        cited += [(path, ROOT / m) for m in re.findall(r"\b(docs/[\w./-]+\.md)", path.read_text(encoding="utf-8"))]
    for path in (ROOT / "docs").glob("*.md"):
        cited += [(path, path.parent / m) for m in re.findall(r"\]\(([\w./-]+\.md)\)", path.read_text(encoding="utf-8"))]
    missing = sorted({f"{src.relative_to(ROOT)} -> {dst.relative_to(ROOT) if dst.is_relative_to(ROOT) else dst}" for src, dst in cited if not dst.is_file()})
    assert cited and not missing, missing
    for path in PACKAGE.rglob("*.py"):
        assert "R0.md" not in path.read_text(encoding="utf-8"), f"{path} cites R0.md, which is not in the repository (docs/r0.md is)"


def test_plugin_packages_import_only_the_plugin_api():
    """docs/plugin-api.md's table is the list; plugin code (not its tests) imports nothing else of rewardkit."""
    import re

    api = set(re.findall(r"^\| `(rewardkit[\w.]*)` \|", (ROOT / "docs" / "plugin-api.md").read_text(), flags=re.M))
    known = set(modules())
    assert {"rewardkit", "rewardkit.rewards", "rewardkit.hub"} <= api and api <= known
    used = {}
    for path in (ROOT / "plugins").rglob("*.py"):
        if "tests" in path.relative_to(ROOT / "plugins").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rewardkit":
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "rewardkit"]
            else:
                continue
            for t in targets:
                used.setdefault(t, set()).add(str(path.relative_to(ROOT)))
    assert used, "the plugin packages import rewardkit"
    outside = {t: sorted(files) for t, files in used.items() if t not in api}
    assert not outside, f"plugin code imports rewardkit modules outside docs/plugin-api.md: {outside}"
