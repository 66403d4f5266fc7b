"""Test fake: every image decode takes 50 ms longer (``datasets.transforms.decode_uint8``).

Put this folder first on PYTHONPATH; it lets a test kill ``launch.py cache`` in the middle of
filling the decoded cache, whatever the machine's speed. ``SLOW_DECODE_RANK=N`` slows only the
decodes of rank N (and its DataLoader workers): a data straggler; ``SLOW_DECODE_S`` sets the delay.
"""

import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for patching.py
from patching import patch_on_import  # noqa: E402

FORKABLE = True  # decode_uint8 is looked up when Decoder calls it (tests/fakes/patching.py)
DELAY_S = float(os.environ.get("SLOW_DECODE_S", "0.05"))
ONLY_RANK = os.environ.get("SLOW_DECODE_RANK")


def _slow(module):  # noqa: ANN001, ANN202
    decode = module.decode_uint8

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if ONLY_RANK is None or os.environ.get("RANK") == ONLY_RANK:
            time.sleep(DELAY_S)
        return decode(*args, **kwargs)

    module.decode_uint8 = slow


patch_on_import("datasets.transforms", _slow)
