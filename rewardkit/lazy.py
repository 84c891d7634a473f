"""Names a package hands on without importing them yet (PEP 562), so importing the package stays cheap.

`rewardkit --help` loads the default plugin modules (to list their commands)
and must not import torch; the protocols they re-export do.
"""

import importlib


def lazy_attributes(package: str, names: dict[str, str]):
    """A module-level `__getattr__` that imports `names[name]` (a module path) on first use of `name`."""

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
