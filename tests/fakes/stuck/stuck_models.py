"""A model whose forward pass never returns on one rank: a rank that stops entering collectives.

Used by the hang test through ``model.name = "stuck_models:StuckCNN"`` (this folder on
PYTHONPATH). STUCK_RANK and STUCK_AT (a training forward call, counted from 1) say where.
"""

import os
import time

from distrib.engine.models import SmallCNN


class StuckCNN(SmallCNN):
    def __init__(self, num_classes: int):
        super().__init__(num_classes, width=8, batchnorm=False)
        self.calls = 0
        self.stuck = os.environ.get("RANK", "0") == os.environ.get("STUCK_RANK", "1")
        self.at = int(os.environ.get("STUCK_AT", "5"))

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.stuck and self.calls == self.at:
                wait_forever()
        return self.head(self.features(x).mean(dim=(2, 3)))


def wait_forever() -> None:
    while True:  # in Python, so the watchdog thread still runs and dumps this stack
        time.sleep(0.5)
