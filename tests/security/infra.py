"""infra/bootstrap.py as a module (infra/ is not a package: the compose service runs it as a script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

INFRA = Path(__file__).resolve().parents[2] / "infra"
NAME = "loire_infra_bootstrap"  # the name tests/flows/test_bootstrap.py loads it under: one module either way


def load_bootstrap() -> ModuleType:
    if NAME in sys.modules:
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, INFRA / "bootstrap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()
