"""Config loading: every shipped file, typed overrides, and every error case."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

from distrib.config import (
    Config,
    ConfigError,
    Range,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    read_toml,
)

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def test_configs_folder_is_not_empty() -> None:
    assert any(p.name == "default.toml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    again = tmp_path / "again.toml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg.dist.backend == "auto" and cfg.launch.gpus == () and cfg.run.seed == 0


def test_set_overrides_are_typed_like_the_field() -> None:
    cfg = load_config(
        None, ["dist.timeout_s=5", "run.seed=7", "dist.backend=gloo", "launch.gpus=1,0", "run.name=my-run"]
    )
    assert cfg.dist.timeout_s == 5.0 and isinstance(cfg.dist.timeout_s, float)
    assert cfg.run.seed == 7 and cfg.dist.backend == "gloo" and cfg.run.name == "my-run"
    assert cfg.launch.gpus == (1, 0)
    assert load_config(None, ["launch.gpus=[2, 3]"]).launch.gpus == (2, 3)


def test_set_on_a_text_field_keeps_the_text() -> None:
    cfg = load_config(None, ["run.name=nan", "run.out_dir=2024", "checkpoint.resume=auto"])
    assert cfg.run.name == "nan" and cfg.run.out_dir == "2024" and cfg.checkpoint.resume == "auto"


def test_set_wins_over_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[run]\nseed = 3\n")
    assert load_config(p).run.seed == 3
    assert load_config(p, ["run.seed=4"]).run.seed == 4


def test_missing_file_names_it_and_lists_shipped_configs() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("nope/absent.toml")
    assert "nope/absent.toml" in str(e.value) and "does not exist" in str(e.value)
    assert "default.toml" in str(e.value)


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[run]\nseed = 1\nname = \n")
    with pytest.raises(ConfigError) as e:
        read_toml(p)
    assert "line 3" in str(e.value) and str(p) in str(e.value)


def test_unknown_key_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"dist": {"timeout": 5}})
    assert "unknown key 'dist.timeout'" in str(e.value) and "timeout_s" in str(e.value)


def test_unknown_section_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"lanch": {"gpus": [0]}})
    assert "'[lanch]'" in str(e.value) and "launch" in str(e.value)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"run": {"seed": "one"}}, "run.seed: expected an integer, got 'one'"),
        ({"run": {"seed": True}}, "run.seed: expected an integer"),
        ({"dist": {"timeout_s": "fast"}}, "dist.timeout_s: expected a number"),
        ({"launch": {"gpus": 0}}, "launch.gpus: expected a list of an integer"),
        ({"launch": {"gpus": ["a"]}}, "launch.gpus[0]: expected an integer"),
        ({"dist": {"backend": "mpi"}}, "dist.backend: 'mpi' is not one of auto, nccl, gloo"),
        ({"run": 3}, "[run] must be a table"),
    ],
)
def test_wrong_types_are_rejected(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert needle in str(e.value)


def test_all_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"run": {"seed": "x", "nam": "a"}, "dist": {"backend": 1}})
    assert len(e.value.errors) == 3


def test_set_unknown_key_and_bad_value() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["dist.tiemout_s=5", "run.seed=abc"])
    text = str(e.value)
    assert "dist.tiemout_s" in text and "timeout_s" in text and "run.seed" in text


@pytest.mark.parametrize("item", ["noequals", "a=1", "a.b.c=1", ".x=1"])
def test_malformed_set_items(item: str) -> None:
    with pytest.raises(ValueError):
        parse_override(item)
    with pytest.raises(ConfigError):
        load_config(None, [item])


# ----------------------------------------------------------------------------- ranges


def _numeric_fields() -> list[tuple[str, str, object]]:
    import dataclasses
    import typing

    out = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            if tp in (int, float) or any(a in (int, float) for a in args for a in typing.get_args(a) or (a,)):
                out.append((sec.name, f.name, f.metadata.get("range")))
    return out


def test_every_numeric_key_has_a_range() -> None:
    fields = _numeric_fields()
    assert len(fields) >= 25
    assert [f"{s}.{k}" for s, k, r in fields if r is None] == []


@pytest.mark.parametrize(
    "item, needle",
    [
        ("optim.momentum=-1", "optim.momentum = -1 is out of range: must be in [0, 1]"),
        ("optim.weight_decay=-1", "optim.weight_decay = -1 is out of range: must be >= 0"),
        ("optim.lr=0", "optim.lr = 0 is out of range: must be > 0"),
        ("optim.gamma=2", "optim.gamma = 2 is out of range: must be in (0, 1]"),
        ("model.width=0", "model.width = 0 is out of range: must be >= 1"),
        ("model.dropout=1", "model.dropout = 1 is out of range: must be in [0, 1)"),
        ("data.std=[0,0,0]", "data.std = [0, 0, 0] is out of range: each value must be in (0, 1] (0 is not)"),
        ("data.mean=[0.5,2,0.5]", "data.mean = [0.5, 2, 0.5] is out of range: each value must be in [0, 1]"),
        ("data.batch_size=-1", "data.batch_size = -1 is out of range: must be >= 1"),
        ("data.num_workers=-2", "data.num_workers = -2 is out of range: must be >= 0"),
        ("data.val_fraction=1", "data.val_fraction = 1 is out of range: must be in [0, 1)"),
        ("data.rotation=-5", "data.rotation = -5 is out of range: must be in [0, 180]"),
        ("data.resize=[0,8]", "data.resize = [0, 8] is out of range: each value must be >= 1"),
        ("dist.timeout_s=0", "dist.timeout_s = 0 is out of range: must be > 0"),
        ("dist.timeout_s=-5", "dist.timeout_s = -5 is out of range: must be > 0"),
        ("dist.timeout_s=inf", "dist.timeout_s = inf is not a finite number"),
        ("train.accum_steps=0", "train.accum_steps = 0 is out of range: must be >= 1"),
        ("train.label_smoothing=1.5", "train.label_smoothing = 1.5 is out of range: must be in [0, 1)"),
        ("train.epochs=0", "train.epochs = 0 is out of range: must be >= 1"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last = 0 is out of range: must be >= 1"),
        ("checkpoint.every_steps=-1", "checkpoint.every_steps = -1 is out of range: must be >= 0"),
        ("run.seed=18446744073709551616", "run.seed = 18446744073709551616 is out of range"),
        ("launch.gpus=[-1]", "launch.gpus = [-1] is out of range"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(item: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert needle in str(e.value)


def test_range_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "optim.momentum=-1",
                "model.width=0",
                "dist.timeout_s=0",
                "data.std=[0,0,0]",
                "data.mean=[0.5,0.5,0.5]",
            ],
        )
    assert len(e.value.errors) == 4  # and no spurious "both auto or both given" for mean/std


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64 - 1, 0])
def test_any_64_bit_seed_is_accepted_and_usable(seed: int) -> None:
    import numpy as np

    from datasets.folder import stratified_split
    from distrib.seeding import derive_seed

    assert load_config(None, [f"run.seed={seed}"]).run.seed == seed
    assert 0 <= derive_seed(seed, 1, 2) < 2**63
    tr, va = stratified_split(np.array([0, 0, 0, 1, 1, 1]), 0.3, seed)
    assert len(tr) + len(va) == 6
    assert derive_seed(-1, 1) != derive_seed(1, 1)


def test_run_name_is_a_plain_folder_name() -> None:
    for bad in ("..", "a/b", "."):
        with pytest.raises(ConfigError, match="must be a plain folder name"):
            load_config(None, [f"run.name={bad}"])


# Every numeric key's interval, written out here: widening one in distrib/config.py (data.hflip
# accepting 1.5) or adding a key without one fails below, whatever the config module says.
BOUNDS = {
    "run.seed": "[-9223372036854775808, 18446744073709551616)", "launch.gpus": "[0, inf)",
    "dist.timeout_s": "(0, inf)", "data.synthetic": "[0, inf)", "data.val_fraction": "[0, 1)",
    "data.batch_size": "[1, inf)", "data.num_workers": "[0, inf)", "data.resize": "[1, inf)",
    "data.crop": "[1, inf)", "data.crop_scale": "(0, 1]", "data.hflip": "[0, 1]", "data.vflip": "[0, 1]",
    "data.rotation": "[0, 180]", "data.mean": "[0, 1]", "data.std": "(0, 1]", "model.width": "[1, inf)",
    "model.dropout": "[0, 1)", "optim.lr": "(0, inf)", "optim.momentum": "[0, 1]",
    "optim.weight_decay": "[0, inf)", "optim.warmup_epochs": "[0, inf)", "optim.step_epochs": "[1, inf)",
    "optim.gamma": "(0, 1]", "train.epochs": "[1, inf)", "train.max_steps": "[0, inf)",
    "train.label_smoothing": "[0, 1)", "train.grad_clip": "[0, inf)", "train.accum_steps": "[1, inf)",
    "train.global_batch": "[0, inf)", "train.log_every": "[1, inf)", "checkpoint.every_steps": "[0, inf)",
    "checkpoint.keep_last": "[1, inf)",
    "memory.interval_s": "(0, inf)", "memory.warmup_steps": "[0, inf)", "memory.check_every": "[1, inf)",
    "memory.min_steps": "[3, inf)", "memory.min_rate_kb": "(0, inf)", "memory.min_growth_mb": "(0, inf)",
    "memory.census_gap": "[1, inf)", "timing.window": "[2, inf)", "timing.ratio": "(1, inf)",
    "timing.min_share": "[0, 1]", "timing.patience": "[1, inf)",
}  # fmt: skip


def _setting(key: str, value: float) -> list[str]:
    """--set items giving ``key`` the value (lists filled with it; data.mean/std given together)."""
    v = repr(value)
    lists = {"launch.gpus": 1, "data.resize": 2, "data.crop": 2, "data.crop_scale": 2, "data.mean": 3,
             "data.std": 3}  # fmt: skip
    item = f"{key}=[{', '.join([v] * lists[key])}]" if key in lists else f"{key}={v}"
    partner = {"data.mean": "data.std=[0.5, 0.5, 0.5]", "data.std": "data.mean=[0.5, 0.5, 0.5]"}
    return [item, *([partner[key]] if key in partner else [])]


def _edges(key: str, interval: str, integer: bool) -> tuple[list[float], list[float]]:
    """(values just inside each end, values just outside) of ``interval``."""
    m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
    assert m, interval
    kind = int if integer else float
    lo, hi = (None if "inf" in t else kind(t) for t in (m.group(2), m.group(3)))  # exact for 2**64
    step = 1 if integer else 1e-6
    inside, outside = [], []
    if lo is not None:
        inside.append(lo + step if m.group(1) == "(" else lo)
        outside.append(lo if m.group(1) == "(" else lo - step)
    if hi is not None:
        inside.append(hi - step if m.group(4) == ")" else hi)
        outside.append(hi if m.group(4) == ")" else hi + step)
    else:
        inside.append(10**6)
    return inside, outside


def test_every_numeric_keys_bounds_hold_from_both_sides() -> None:
    fields = {f"{s}.{k}": r for s, k, r in _numeric_fields()}
    assert sorted(fields) == sorted(BOUNDS), "a numeric key without its interval in BOUNDS, or one gone"
    for key, interval in BOUNDS.items():
        assert str(fields[key]) == str(Range.parse(interval)), f"{key}: {fields[key]}, not {interval}"
        integer = key not in FLOAT_KEYS
        inside, outside = _edges(key, interval, integer)
        for value in inside:
            load_config(None, _setting(key, value))  # accepted
        for value in outside:
            with pytest.raises(ConfigError, match=re.escape(key)):
                load_config(None, _setting(key, value))


FLOAT_KEYS = {
    "dist.timeout_s", "data.val_fraction", "data.crop_scale", "data.hflip", "data.vflip", "data.rotation",
    "data.mean", "data.std", "model.dropout", "optim.lr", "optim.momentum", "optim.weight_decay",
    "optim.warmup_epochs", "optim.gamma", "train.label_smoothing", "train.grad_clip", "memory.interval_s",
    "memory.min_rate_kb", "memory.min_growth_mb", "timing.ratio", "timing.min_share",
}  # fmt: skip


def test_every_list_key_takes_the_same_comma_syntax() -> None:
    cfg = load_config(None, ["data.mean=0.5,0.4,0.3", "data.std=0.2, 0.2, 0.2", "data.resize=64,48",
                             "launch.gpus=1,0", "data.crop_scale=0.5,1"])  # fmt: skip
    assert cfg.data.mean == (0.5, 0.4, 0.3) and cfg.data.std == (0.2, 0.2, 0.2)
    assert cfg.data.resize == (64, 48) and cfg.launch.gpus == (1, 0) and cfg.data.crop_scale == (0.5, 1.0)
    assert load_config(None, ["data.mean=auto", "data.std=auto"]).data.mean == "auto"
