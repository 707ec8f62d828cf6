"""Packages whose public names load on first use, so that importing one light part of a package (its config,
for ``--help``) does not import torch through the package's ``__init__``."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) for ``package``: each name of ``exports`` is imported from the submodule
    it maps to when first asked for, then kept in the package."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
