"""Test fake: a broken resume. ``GlobalOrder.start_at`` starts one global batch early, so the
step before the checkpoint is trained twice, the bug the sample ledger exists to catch.

Put this folder first on PYTHONPATH (the launcher passes it on to the ranks).
"""

import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for patching.py
from patching import patch_on_import  # noqa: E402


def _replay(module):  # noqa: ANN001, ANN202
    right = module.GlobalOrder.start_at

    def replaying(self, samples):  # noqa: ANN001, ANN202
        right(self, max(0, samples - self.global_batch))

    module.GlobalOrder.start_at = replaying


patch_on_import("datasets.samplers", _replay)
