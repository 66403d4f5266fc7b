"""A model that leaks the way user code does: it keeps every training output with its graph.

Used by the memory tests through ``model.name = "leaky_models:LeakyCNN"`` (this folder on
PYTHONPATH). LEAKY_FROM (a step number) delays the leak, to test a leak that starts late.
"""

import os

from distrib.engine.models import SmallCNN

KEPT = []  # module level, as a user's "history" list would be


class LeakyCNN(SmallCNN):
    def __init__(self, num_classes: int):
        super().__init__(num_classes, width=8, batchnorm=False)
        self.calls = 0
        self.start = int(os.environ.get("LEAKY_FROM", "0"))

    def forward(self, x):
        feats = self.features(x)
        if self.training:
            self.calls += 1
            if self.calls > self.start:
                KEPT.append(feats)  # the leak: an intermediate output and its autograd graph stay alive
        return self.head(feats.mean(dim=(2, 3)))


class QuietCNN(SmallCNN):
    """The same network without the leak (a control with the same import path)."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes, width=8, batchnorm=False)
