"""Models by name: a small CNN for the demo job, or any torchvision classifier.

Pretrained weights come only from a local file: nothing is downloaded, so a job behaves
the same on an air-gapped cluster node as on a laptop.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
from torch import nn

from distrib.config import ModelSection
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Three conv stages (conv-[BN]-ReLU-pool) and a linear head; fast on a CPU."""

    def __init__(self, num_classes: int, width: int = 32, batchnorm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for k in range(3):
            cout = width * 2**k
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(cout)] if batchnorm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a mean, not adaptive_avg_pool2d: same value, and deterministic on CUDA
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_model(cfg: ModelSection, num_classes: int) -> nn.Module:
    """The configured model with ``num_classes`` outputs (weights from cfg.weights if set)."""
    if cfg.name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes, cfg.width, cfg.batchnorm)
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if cfg.name not in names:
            close = difflib.get_close_matches(cfg.name, names + ["small_cnn"], n=3)
            raise LaunchError(
                f"model.name {cfg.name!r} is not small_cnn or a torchvision classifier"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes)
    if cfg.weights:
        load_weights(model, Path(cfg.weights))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local state dict (or one of our checkpoints); a different head is left fresh."""
    if not path.is_file():
        raise LaunchError(f"model.weights {path} does not exist (weights are never downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LaunchError(f"model.weights {path} cannot be read as a torch state dict: {e}") from e
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(usable, strict=False)
    if skipped:
        log.info(
            "weights: %d tensor(s) with another shape left fresh (e.g. the class head): %s",
            len(skipped),
            ", ".join(skipped[:4]),
        )
    if unexpected or len(missing) > len(skipped):
        raise LaunchError(
            f"model.weights {path} does not fit model: missing {list(missing)[:4]}, "
            f"unexpected {list(unexpected)[:4]}"
        )
