"""Property-based tests (hypothesis): random configs and --set values, random label CSVs and
relabelings on real files, random sampler shapes. The invariants: no file lost or placed twice,
every index once per epoch across ranks, and every rejected input a LaunchError (a message for
the user), never another exception."""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
import tempfile
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LAUNCH
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from datasets.organize import MANIFEST, organize
from datasets.samplers import BalancedSampler, ExactEvalSampler, TrainSampler
from distrib.config import Config, dump_config, load_config
from distrib.context import DistContext
from distrib.errors import LaunchError


def examples(n: int) -> settings:
    """n random cases, no deadline (2 shared cores), no example database left in the checkout."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


# --------------------------------------------------------------------------- config and --set


def _keys() -> list[tuple[str, dataclasses.Field]]:
    out = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):  # type: ignore[misc]
            out.append((f"{sec.name}.{f.name}", f))
    return out


KEYS = _keys()
FIELDS = dict(KEYS)
VALUE_TEXT = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["true", "false", "nan", "inf", "-inf", "1e400", "[]", "[1, 2, 3]", '""', "[0.5, 0.5, 0.5]"]
    ),
    st.lists(st.floats(-2, 2, allow_nan=False), max_size=4).map(str),
    st.text(max_size=12),
    st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
)
KEY_TEXT = st.one_of(
    st.sampled_from([k for k, _ in KEYS]),
    st.text(max_size=15),
    st.sampled_from(["train", "train.", ".epochs", "train.epochs.x", "nosuch.key", "data.batchsize"]),
)


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@examples(300)
@given(st.lists(st.tuples(KEY_TEXT, VALUE_TEXT), min_size=1, max_size=4))
def test_any_set_is_loaded_in_range_or_refused_with_a_message(items: list[tuple[str, str]]) -> None:
    overrides = [f"{k}={v}" for k, v in items]
    try:
        cfg = load_config(None, overrides)
    except LaunchError as e:
        assert str(e).strip()  # a message, never an empty error
        return
    for key, _ in items:  # every value that was accepted is within its declared range/choices
        f = FIELDS.get(key.strip())
        if f is None:
            continue
        section, name = key.strip().split(".")
        value = getattr(getattr(cfg, section), name)
        allowed = f.metadata.get("range")
        for v in _values(value):
            if allowed is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                assert math.isfinite(v) and v in allowed, (key, v, allowed)
        if "choices" in f.metadata:
            assert value in f.metadata["choices"], (key, value)


def _bounded(allowed: Any, integer: bool) -> st.SearchStrategy[Any]:
    lo = -1e6 if allowed is None or allowed.lo is None else allowed.lo
    hi = 1e6 if allowed is None or allowed.hi is None else allowed.hi
    if integer:
        return st.integers(
            math.floor(lo) + bool(allowed and allowed.lo_open),
            math.ceil(hi) - bool(allowed and allowed.hi_open),
        )
    return st.floats(
        lo, hi, exclude_min=bool(allowed and allowed.lo_open), exclude_max=bool(allowed and allowed.hi_open)
    )


def plausible(key: str) -> st.SearchStrategy[str]:
    """Values of the field's own type and range (the refusals are the other test's business)."""
    section, name = key.split(".")
    f, tp = FIELDS[key], typing.get_type_hints(type(getattr(Config(), section)))[name]
    allowed = f.metadata.get("range")
    if "choices" in f.metadata:
        return st.sampled_from(f.metadata["choices"])
    if tp is bool:
        return st.sampled_from(["true", "false"])
    if tp in (int, float):
        return _bounded(allowed, tp is int).map(repr)
    if tp is str:
        return st.text(st.characters(codec="utf-8"), max_size=10).map(
            lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'
        )
    item = (typing.get_args(tp) or (float,))[0]
    return st.lists(_bounded(allowed, item is int), min_size=1, max_size=3).map(
        lambda xs: "[" + ", ".join(map(repr, xs)) + "]"
    )


@st.composite
def plausible_overrides(draw: st.DrawFn) -> list[str]:
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=6, unique=True))
    return [f"{k}={draw(plausible(k))}" for k in keys]


@examples(150)
@given(plausible_overrides())
def test_an_accepted_config_prints_and_reloads_to_itself(overrides: list[str]) -> None:
    try:
        cfg = load_config(None, overrides)
    except LaunchError:
        event("refused (a cross-key rule)")
        return
    event("accepted")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.toml"
        path.write_text(dump_config(cfg))
        assert load_config(path) == cfg


@examples(8)
@given(st.lists(st.tuples(KEY_TEXT, VALUE_TEXT), min_size=1, max_size=3))
def test_the_cli_answers_any_set_with_a_config_or_one_error_line(items: list[tuple[str, str]]) -> None:
    argv = [a for k, v in items for a in ("--set", f"{k}={v}".replace("\0", ""))]  # argv holds no NUL
    res = subprocess.run(
        [sys.executable, LAUNCH, "config", *argv], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.returncode in (0, 2), res.stderr[-2000:]
    if res.returncode == 2:
        assert res.stderr.startswith("[launcher] ERROR: "), res.stderr[-2000:]


# --------------------------------------------------------------------------- organize

NAME = st.text(st.sampled_from("abcXY_-. 1é"), min_size=1, max_size=6).filter(lambda s: s.strip(" .") != "")
LABEL = st.one_of(
    st.sampled_from(["ok", "defect", "a b", "é", "..", "", "x/y", " pad"]),
    st.text(st.sampled_from("abc"), min_size=1, max_size=2),
)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "label"])
        w.writerows(rows)


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@st.composite
def datasets_and_relabelings(draw: st.DrawFn) -> tuple[list[str], list[list[tuple[str, str]]], str]:
    names = draw(st.lists(NAME.map(lambda s: s.strip() + ".png"), min_size=1, max_size=8, unique=True))
    names = [f"sub/{n}" if draw(st.booleans()) else n for n in names]
    rounds = []
    for _ in range(draw(st.integers(1, 3))):
        kept = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names) + 2))  # repeats too
        rounds.append([(n, draw(LABEL)) for n in kept])
    return names, rounds, draw(st.sampled_from(["link", "copy", "symlink"]))


@examples(100)
@given(datasets_and_relabelings())
def test_organize_places_every_listed_file_once_under_its_label_and_loses_none(
    case: tuple[list[str], list[list[tuple[str, str]]], str],
) -> None:
    names, rounds, mode = case
    with tempfile.TemporaryDirectory() as d:
        images, out, table = Path(d) / "images", Path(d) / "out", Path(d) / "labels.csv"
        for i, n in enumerate(names):
            (images / n).parent.mkdir(parents=True, exist_ok=True)
            (images / n).write_bytes(f"image {i} {n}".encode())
        sources = _tree(images)
        for rows in rounds:
            _write_csv(table, rows)
            before = _tree(out) if out.exists() else {}
            try:
                organize(table, images, out, mode=mode)
            except LaunchError as e:
                event("refused")
                assert str(e).strip()
                assert (_tree(out) if out.exists() else {}) == before  # refused: nothing changed
                continue
            event("relabelled" if before else "placed")
            given_labels: dict[str, set[str]] = {}
            for n, label in rows:
                given_labels.setdefault(n, set()).add(label.strip())
            assert all(len(v) == 1 for v in given_labels.values()), "a file labelled twice was accepted"
            placed = {k: v for k, v in _tree(out).items() if k != MANIFEST}
            want = {f"{label.strip()}/{Path(n).name}": sources[n] for n, label in rows}  # the CSV is stripped
            assert placed == want  # each listed file once, under its label, with its bytes; nothing else
            assert _tree(images) == sources  # no source lost


# --------------------------------------------------------------------------- samplers


def ranks(world: int) -> list[DistContext]:
    return [DistContext(rank=r, world_size=world, local_rank=r, local_world_size=world) for r in range(world)]


def _divisor(data: st.DataObject, g: int) -> int:
    return data.draw(st.sampled_from([w for w in range(1, g + 1) if g % w == 0]))


@examples(300)
@given(st.integers(0, 300), st.integers(1, 48), st.integers(-(2**63), 2**63), st.integers(0, 9), st.data())
def test_an_epoch_trains_the_same_samples_in_the_same_steps_at_every_world_size(
    n: int, g: int, seed: int, epoch: int, data: st.DataObject
) -> None:
    """Global batch g on any world size that divides it: step s covers positions [s*g, (s+1)*g) of
    the epoch's order, the same set as on one rank; the n % g positions after the last step are
    left out; no index twice."""
    world = _divisor(data, g)
    one = TrainSampler(n, ranks(1)[0], seed, g)
    one.set_epoch(epoch)
    order = one.order(epoch).tolist()
    e = n // g * g
    assert [i for i, _ in one] == order[:e] and sorted(order) == list(range(n))
    per_rank = g // world
    steps: list[set[int]] = [set() for _ in range(n // g)]
    for ctx in ranks(world):
        s = TrainSampler(n, ctx, seed, g)
        s.set_epoch(epoch)
        keys = list(s)
        assert len(keys) == len(s) == e // world and all(k[1] == epoch for k in keys)
        for step in range(n // g):
            steps[step].update(i for i, _ in keys[step * per_rank : (step + 1) * per_rank])
    assert steps == [set(order[k * g : (k + 1) * g]) for k in range(n // g)]


@examples(200)
@given(st.integers(1, 200), st.integers(1, 24), st.integers(0, 2**32), st.integers(0, 9), st.data())
def test_an_epoch_stopped_on_one_world_size_and_resumed_on_another_trains_each_sample_once(
    n: int, g: int, seed: int, epoch: int, data: st.DataObject
) -> None:
    before, after = _divisor(data, g), _divisor(data, g)
    steps = n // g
    stop = data.draw(st.integers(0, steps)) * g  # a checkpoint at a step boundary
    trained: Counter[int] = Counter()
    for ctx in ranks(before):
        s = TrainSampler(n, ctx, seed, g)
        s.set_epoch(epoch)
        trained.update(i for i, _ in list(s)[: stop // before])
    for ctx in ranks(after):
        s = TrainSampler(n, ctx, seed, g)
        s.set_epoch(epoch)
        s.start_at(stop)
        trained.update(i for i, _ in s)
    order = TrainSampler(n, ranks(1)[0], seed, g).order(epoch).tolist()
    assert trained == Counter(order[: steps * g])
    with pytest.raises(ValueError, match="not a step boundary"):
        TrainSampler(n, ranks(1)[0], seed, g).start_at(stop + 1 if g > 1 else steps * g + 1)


@examples(300)
@given(st.integers(0, 500), st.integers(1, 16))
def test_evaluation_shards_hold_every_index_exactly_once(n: int, world: int) -> None:
    seen = Counter(i for ctx in ranks(world) for i, _ in ExactEvalSampler(n, ctx))
    assert sorted(seen) == list(range(n)) and set(seen.values()) <= {1}


@examples(100)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=99), st.integers(1, 12), st.integers(0, 2**31), st.data()
)
def test_balanced_shards_are_equal_and_come_from_one_draw(
    targets: list[int], g: int, seed: int, data: st.DataObject
) -> None:
    t = np.unique(np.asarray(targets), return_inverse=True)[1]  # classes 0..K-1, each present, as ImageFolder
    world = _divisor(data, g)
    shards = []
    for ctx in ranks(world):
        s = BalancedSampler(t, ctx, seed, g)
        s.set_epoch(3)
        shards.append([i for i, _ in s])
        again = BalancedSampler(t, ctx, seed, g)  # another process, same (seed, epoch): the same shard
        again.set_epoch(3)
        assert [i for i, _ in again] == shards[-1]
    draw = BalancedSampler(t, ranks(1)[0], seed, g).order(3).tolist()  # one draw, whatever the world
    e = len(t) // g * g
    assert len({len(x) for x in shards}) == 1 and sum(map(len, shards)) == e
    assert sorted(i for x in shards for i in x) == sorted(draw[:e])
