"""Test fake: every image decode takes 50 ms longer (``datasets.transforms.decode_uint8``).

Put this folder first on PYTHONPATH; it lets a test kill ``launch.py cache`` in the middle of
filling the decoded cache, whatever the machine's speed.
"""

import importlib.abc
import importlib.util
import sys
import time

DELAY_S = 0.05


class _SlowDecode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name != "datasets.transforms":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            load(module)
            decode = module.decode_uint8

            def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                time.sleep(DELAY_S)
                return decode(*args, **kwargs)

            module.decode_uint8 = slow

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _SlowDecode())
