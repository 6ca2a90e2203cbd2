"""Old import paths (``broker_worker.jobs``, ``broker_worker.tiling``, …) keep working for scripts written against
earlier releases: each is an alias of the module's new home, imported only when asked for (so importing the
protocol side still never imports torch)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

PROTOCOL = ("client", "connections", "constants", "errors", "health", "images", "jobs", "messages", "states")
MODEL = (
    "batching",
    "decoding",
    "device_map",
    "engine",
    "fake_engine",
    "internvl_engine",
    "loading",
    "prompt",
    "prompt_tokens",
    "tiling",
    "tiny_model",
)
MOVED = {f"broker_worker.{m}": f"broker_worker.protocol.{m}" for m in PROTOCOL} | {
    f"broker_worker.{m}": f"broker_worker.model.{m}" for m in MODEL
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Already executed under its new name."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _Alias(new)) if new else None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
