"""Registry of quantization methods: every module in this package that defines a QuantMethod subclass."""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Dict, List, Type

from sweep.methods.base import QuantMethod


@lru_cache(maxsize=1)
def _registry() -> Dict[str, Type[QuantMethod]]:
    found: Dict[str, Type[QuantMethod]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, QuantMethod) and obj is not QuantMethod and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return found


def available_methods() -> List[str]:
    return sorted(_registry())


def get_method(name: str) -> Type[QuantMethod]:
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available methods are {', '.join(available_methods())}") from None
