"""Lazy re-exports for the packages' ``__init__``: ``from mtrec_dist.training import train_recommender`` works
without ``import mtrec_dist.training`` importing torch, TorchRec and Ray up front.

Why: the CLI imports ``mtrec_dist`` for every command, ``mtrec --help`` must stay fast (< 2 s), and most
public names live in modules that pull in torch.  A name is imported on first use (PEP 562 module
``__getattr__``) and cached in the package's namespace.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable, List[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``; ``exports`` maps a public name to the module
    (relative to ``package``, e.g. ``".reward"``) that defines it."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__, sorted(exports)
