"""Models by name: a small CNN for the demo job, or any torchvision classifier.

Pretrained weights come only from a local file: nothing is downloaded, so a job behaves
the same on an air-gapped cluster node as on a laptop.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distrib.config import ModelSection
from distrib.engine import checkpoint as ck
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Three conv stages (conv-[BN]-ReLU-pool) and a linear head; fast on a CPU."""

    def __init__(self, num_classes: int, width: int = 32, batchnorm: bool = True, dropout: float = 0.0):
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
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # no tensors: same state dict
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a mean, not adaptive_avg_pool2d: same value, and deterministic on CUDA
        return self.head(self.drop(self.features(x).mean(dim=(2, 3))))


def build_model(cfg: ModelSection, num_classes: int) -> nn.Module:
    """The configured model with ``num_classes`` outputs (weights from cfg.weights if set)."""
    if cfg.name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes, cfg.width, cfg.batchnorm, cfg.dropout)
    elif ":" in cfg.name:
        model = import_model(cfg.name, num_classes)
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
        load_weights(model, Path(cfg.weights), num_classes, strict=cfg.weights_strict)
    return model


def accepts(model: nn.Module, size: int) -> bool:
    """One forward pass of a 1 x 3 x size x size image on the CPU works (no layer shrinks it to 0)."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError:
        return False
    return True


def smallest_input(model: nn.Module, limit: int = 4096) -> int | None:
    """The smallest square image side ``model`` takes (pooling and strides shrink it), by doubling
    then bisecting; None if nothing up to ``limit`` works."""
    hi = 1
    while not accepts(model, hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2  # fails (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if accepts(model, mid) else (mid, hi)
    return hi


def import_model(spec: str, num_classes: int) -> nn.Module:
    """'package.module:Class' -> Class(num_classes=...): a user's own model, importable from PYTHONPATH."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise LaunchError(
            f"model.name {spec!r}: cannot import {attr!r} from {module_name!r} ({e}); the module must be "
            "importable by every rank (PYTHONPATH) and define that class or function"
        ) from None
    model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise LaunchError(f"model.name {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def head_keys(model: nn.Module, num_classes: int) -> set[str]:
    """State-dict keys of the classifier head(s): Linear/Conv layers with ``num_classes`` outputs.

    (resnet ``fc``, vgg ``classifier.6``, squeezenet's final conv, inception's aux head, ...)
    """
    keys = set()
    for name, mod in model.named_modules():
        out = getattr(mod, "out_features", getattr(mod, "out_channels", None))
        if isinstance(mod, nn.Linear | nn.Conv2d) and out == num_classes:
            keys |= {f"{name}.{p}" if name else p for p, _ in mod.named_parameters(recurse=False)}
    return keys


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm's step counter: not a learned tensor


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the model of one of our checkpoints (its digest verified)."""
    state = ck.read_torch_file(path, "model.weights")
    if isinstance(state, dict) and "model" in state and "format" in state:
        ck.verify(state, path)
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LaunchError(f"model.weights {path} is not a state dict (a mapping of names to tensors)")
    return state


@dataclass(frozen=True)
class WeightsFit:
    """How a state dict fits a model: what loads, which heads stay fresh, what does not fit."""

    usable: dict[str, torch.Tensor]
    heads: dict[str, tuple[list[int], list[int]]]  # key: (shape in the file, shape in the model)
    problems: list[str]
    learned: int  # learned tensors of the model (BatchNorm step counters aside)

    @property
    def loaded(self) -> int:
        return sum(1 for k in self.usable if not _is_counter(k))


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> WeightsFit:
    """Compare a state dict with the model, tensor by tensor (pure: nothing is loaded)."""
    own = model.state_dict()
    shape = {
        k: (list(v.shape), list(own[k].shape))
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    }
    heads = head_keys(model, num_classes)
    head = {k: s for k, s in shape.items() if k in heads and s[0][1:] == s[1][1:]}
    problems = [f"{k} {s[0]} in the file, {s[1]} in the model" for k, s in shape.items() if k not in head]
    problems += [f"{k} missing from the file" for k in own if k not in state and not _is_counter(k)]
    problems += [f"{k} not in the model" for k in state if k not in own]
    usable = {k: v for k, v in state.items() if k in own and k not in shape}
    return WeightsFit(usable, head, problems, sum(1 for k in own if not _is_counter(k)))


def load_weights(model: nn.Module, path: Path, num_classes: int, strict: bool = True) -> None:
    """Load a local state dict; only a head for another class count may stay fresh (unless not strict).

    Why strict by default: loading weights of another width skips every tensor for its
    shape, and a run that silently trains from scratch looks like a bad fine-tune.
    """
    if not path.is_file():
        raise LaunchError(f"model.weights {path} does not exist (weights are never downloaded)")
    fit = fit_weights(model, read_state_dict(path), num_classes)
    for k, (theirs, ours) in fit.heads.items():
        log.info("weights: classifier head %s is %s in %s, %s here (another class count): left fresh",
                 k, theirs, path.name, ours)  # fmt: skip
    if fit.problems and (strict or not fit.loaded):
        hint = (
            "set model.weights_strict = false to load the tensors that fit on purpose"
            if fit.loaded
            else "no learned tensor fits: are these weights of another model or model.width?"
        )
        more = f"; and {len(fit.problems) - 6} more" if len(fit.problems) > 6 else ""
        raise LaunchError(
            f"model.weights {path} does not fit {len(fit.problems)} tensor(s) of the model: "
            f"{'; '.join(fit.problems[:6])}{more}. {hint}"
        )
    model.load_state_dict(fit.usable, strict=False)
    partial = f" (weights_strict = false; {len(fit.problems)} left fresh or ignored)" if fit.problems else ""
    log.info("weights: loaded %d of %d learned tensor(s) from %s%s", fit.loaded, fit.learned, path, partial)
