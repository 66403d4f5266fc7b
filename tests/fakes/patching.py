"""For the fakes' sitecustomize.py files: change a module of ours as it is first imported.

A fake folder goes first on PYTHONPATH (the launcher passes it on to the ranks); its
sitecustomize.py puts this folder's parent on sys.path and calls ``patch_on_import``.
A sitecustomize.py that says ``FORKABLE = True`` changes only attributes that are looked up when
called (no other module bound them by name at import): patching the already imported module of
a forked run then does what patching it on import does, and the fork server runs it in forked
runs instead of starting fresh interpreters.
"""

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _Patch(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, change: Callable[[ModuleType], None]):
        self.name, self.change = name, change

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            self.change(module)

        spec.loader.exec_module = exec_module
        return spec


def patch_on_import(name: str, change: Callable[[ModuleType], None]) -> None:
    """Run ``change(module)`` right after module ``name`` is first executed; at once if it was
    (a run forked from the tests' fork server, which imported the project: tests/zygote.py)."""
    if name in sys.modules:
        change(sys.modules[name])
        return
    sys.meta_path.insert(0, _Patch(name, change))
