"""Test fake: a broken resume. ``GlobalOrder.start_at`` starts one global batch early, so the
step before the checkpoint is trained twice, the bug the sample ledger exists to catch.

Put this folder first on PYTHONPATH (the launcher passes it on to the ranks).
"""

import importlib.abc
import importlib.util
import sys


class _Replay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name != "datasets.samplers":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            load(module)
            right = module.GlobalOrder.start_at

            def replaying(self, samples):  # noqa: ANN001, ANN202
                right(self, max(0, samples - self.global_batch))

            module.GlobalOrder.start_at = replaying

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Replay())
