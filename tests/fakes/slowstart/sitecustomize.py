"""Test fake: rank ``SLOW_START_RANK`` of ``run`` reaches its script ``SLOW_START_S`` seconds late.

Put this folder first on PYTHONPATH; the delay sits in the preflight just before the script
starts (``distrib.memory.userscript.preflight_gpu``), so another rank can fail, and the agent
SIGTERM this one, before its script runs: a rank slow to import torch on a busy host.
"""

import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for patching.py
from patching import patch_on_import  # noqa: E402

FORKABLE = True  # preflight_gpu is looked up when script_job calls it (tests/fakes/patching.py)
DELAY_S = float(os.environ.get("SLOW_START_S", "5"))
RANK = os.environ.get("SLOW_START_RANK", "0")


def _late(module):  # noqa: ANN001, ANN202
    preflight = module.preflight_gpu

    def late(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if os.environ.get("RANK") == RANK:
            time.sleep(DELAY_S)
        return preflight(*args, **kwargs)

    module.preflight_gpu = late


patch_on_import("distrib.memory.userscript", _late)
