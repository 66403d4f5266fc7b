"""Test fake: every image decode takes 50 ms longer (``datasets.transforms.decode_uint8``).

Put this folder first on PYTHONPATH; it lets a test kill ``launch.py cache`` in the middle of
filling the decoded cache, whatever the machine's speed.
"""

import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for patching.py
from patching import patch_on_import  # noqa: E402

DELAY_S = 0.05


def _slow(module):  # noqa: ANN001, ANN202
    decode = module.decode_uint8

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(DELAY_S)
        return decode(*args, **kwargs)

    module.decode_uint8 = slow


patch_on_import("datasets.transforms", _slow)
