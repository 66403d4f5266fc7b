"""The decoded-image cache with real image files, real memory maps and real DataLoader workers."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, clean_env, launch
from PIL import Image

from datasets.cache import EMPTY, ENTRY, FILLED, CachedSource, DecodedCache, open_cache, plan_cache
from datasets.folder import Samples
from datasets.loader import LoaderSpec, build_loader
from datasets.transforms import BadImageError, Decoder, decode_uint8, eval_transform, train_transform
from distrib.config import load_config
from distrib.context import DistContext
from distrib.errors import LaunchError

pytestmark = pytest.mark.timeout(120)


def images(
    folder: Path, n: int, size: tuple[int, int] = (40, 48), ext: str = "png", seed: int = 0
) -> Samples:
    """``n`` random RGB images in two classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.{ext}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return Samples(np.array(paths), np.arange(n, dtype=np.int64) % 2, ("a", "b"))


def cfg_data(*sets: str):
    return load_config(None, list(sets)).data


def batches(
    samples: Samples, data, source, workers: int, epoch: int, train: bool = True
) -> list[torch.Tensor]:
    spec = LoaderSpec(
        seed=7, batch_size=5, num_workers=workers, train=train, decoder=Decoder.from_config(data)
    )
    tf = train_transform(data) if train else eval_transform(data)
    loader = build_loader(samples, tf, DistContext(), spec, source)
    return [b.images for b in loader.epoch(epoch)]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_bit_identical_with_the_cache_on_or_off(tmp_path: Path, workers: int) -> None:
    samples = images(tmp_path / "img", 10)
    data = cfg_data("data.resize=[24, 20]", "data.crop=[16, 16]", "data.hflip=0.5", "data.vflip=0.5",
                    "data.rotation=10")  # fmt: skip
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder.from_config(data))
    source = CachedSource(cache, cache.slots(samples))
    for epoch in (0, 1):  # epoch 0 fills the cache, epoch 1 reads it
        off = batches(samples, data, None, workers, epoch)
        on = batches(samples, data, source, workers, epoch)
        assert len(on) == len(off) and all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
    assert cache.filled() == len(samples)  # the workers' writes landed in the one shared file
    val_off = batches(samples, data, None, workers, 0, train=False)
    val_on = batches(samples, data, source, workers, 0, train=False)
    assert all(torch.equal(a, b) for a, b in zip(val_on, val_off, strict=True))


def _cached_loader(tmp_path: Path, workers: int, n: int = 10, inline: bool = True):
    samples = images(tmp_path / "img", n)
    data = cfg_data("data.resize=[24, 20]", "data.hflip=0.5")
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder.from_config(data))
    spec = LoaderSpec(seed=7, batch_size=5, num_workers=workers, train=True,
                      decoder=Decoder.from_config(data), cache_inline=inline)  # fmt: skip
    source = CachedSource(cache, cache.slots(samples))
    return samples, build_loader(samples, train_transform(data), DistContext(), spec, source)


def test_a_warm_cache_is_read_in_process_and_an_unfilled_slot_brings_the_workers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples, loader = _cached_loader(tmp_path, workers=2)
    assert loader.warm is not None and not loader.warm()
    for _ in loader.epoch(0):  # cold: DataLoader worker processes decode and fill
        assert multiprocessing.active_children()
    assert loader.warm()
    seen = [b.indices for b in loader.epoch(1)]  # warm: read here, no worker process starts
    assert not multiprocessing.active_children() and len(seen) == len(loader)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(samples)))
    Image.fromarray(np.full((40, 48, 3), 9, dtype=np.uint8)).save(samples.paths[3])  # a file changes
    st = os.stat(samples.paths[3])
    os.utime(samples.paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    decoded: list[str] = []
    real = Decoder.__call__
    monkeypatch.setattr(Decoder, "__call__", lambda self, p, i=-1: decoded.append(p) or real(self, p, i))
    assert loader.warm()  # still warm by its flags: the read checks the file and decodes it again
    images_of = {int(i): x for b in loader.epoch(2) for i, x in zip(b.indices, b.images, strict=True)}
    assert decoded == [samples.paths[3]] and int(images_of[3].max()) == 9
    assert not multiprocessing.active_children()
    cache, slot = loader.warm.__self__.cache, int(loader.warm.__self__.slot_of[5])
    cache._open()[1][slot, 0] = EMPTY  # an image the cache does not hold: the workers decode
    assert not loader.warm()
    for _ in loader.epoch(3):
        assert multiprocessing.active_children()
    assert loader.warm()
    _, kept = _cached_loader(tmp_path / "w", workers=2, inline=False)  # data.cache_read = 'workers'
    list(kept.epoch(0))
    assert kept.warm is None
    for _ in kept.epoch(1):
        assert multiprocessing.active_children()


def test_an_error_in_a_warm_epoch_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples, loader = _cached_loader(tmp_path, workers=2, n=16)
    list(loader.epoch(0))
    real = DecodedCache.get

    def broken(self, slot: int, path: str) -> torch.Tensor:
        if path == samples.paths[5]:
            raise BadImageError(f"cannot read {path}: gone")
        return real(self, slot, path)

    monkeypatch.setattr(DecodedCache, "get", broken)
    with pytest.raises(LaunchError, match=r"img005\.png: gone\. Replace or remove the file"):
        list(loader.epoch(1))


def test_a_filled_slot_is_read_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = images(tmp_path / "img", 3)
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))
    first = cache.get(1, samples.paths[1])
    monkeypatch.setattr(Decoder, "__call__", lambda *a: pytest.fail("decoded a cached image"))
    assert torch.equal(cache.get(1, samples.paths[1]), first)


def test_a_half_written_slot_is_decoded_again(tmp_path: Path) -> None:
    """What a writer killed mid-image leaves: pixels partly written, the slot not yet FILLED."""
    samples = images(tmp_path / "img", 3)
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))
    pixels, entries = cache._open()
    pixels[2, :, :8] = 255  # half an image of garbage, then the writer died
    entries[2, 0] = EMPTY
    truth = Decoder((16, 16))(samples.paths[2])
    assert torch.equal(cache.get(2, samples.paths[2]), truth)
    assert entries[2, 0] == FILLED


def test_a_changed_file_is_decoded_again(tmp_path: Path) -> None:
    samples = images(tmp_path / "img", 3)
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))
    old = cache.get(0, samples.paths[0])
    Image.fromarray(np.full((40, 48, 3), 7, dtype=np.uint8)).save(samples.paths[0])
    st = os.stat(samples.paths[0])
    os.utime(samples.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    new = cache.get(0, samples.paths[0])
    assert not torch.equal(new, old) and int(new.min()) == int(new.max()) == 7
    reopened = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))  # the same folder
    assert reopened.plan.folder == cache.plan.folder and torch.equal(reopened.get(0, samples.paths[0]), new)


def test_another_size_or_decoder_is_another_cache(tmp_path: Path) -> None:
    samples = images(tmp_path / "img", 2)
    folders = {plan_cache([samples], tmp_path, d).folder for d in (Decoder((16, 16)), Decoder((8, 8)))}
    jpgs = images(tmp_path / "jpg", 2, ext="jpg")
    folders |= {
        plan_cache([jpgs], tmp_path, d).folder for d in (Decoder((8, 8), True), Decoder((8, 8), False))
    }
    assert len(folders) == 4


def test_a_cache_without_resize_takes_the_images_size(tmp_path: Path) -> None:
    samples = images(tmp_path / "img", 2, size=(30, 20))
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder())
    assert cache.plan.shape == (3, 30, 20)
    assert torch.equal(cache.get(0, samples.paths[0]), decode_uint8(samples.paths[0]))


def test_mixed_sizes_without_resize_are_refused_with_the_fix(tmp_path: Path) -> None:
    a = images(tmp_path / "a", 3, size=(30, 20))
    b = images(tmp_path / "b", 1, size=(10, 12))
    with pytest.raises(LaunchError, match=r"30x20: 3 image\(s\).*10x12: 1 image.*data.resize = \[30, 20\]"):
        open_cache(DistContext(), [a, b], tmp_path / "c", Decoder())
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing written


def test_an_unwritable_cache_folder_is_refused_with_the_fix(tmp_path: Path) -> None:
    samples = images(tmp_path / "img", 2)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(LaunchError, match=r"data.cache_dir .*file/c is not writable .*set data.cache_dir"):
        open_cache(DistContext(), [samples], tmp_path / "file" / "c", Decoder((8, 8)))


def test_a_cache_bigger_than_the_free_disk_is_refused_before_writing(tmp_path: Path) -> None:
    """A real 64 kB tmpfs in a private mount namespace (unshare -rm); the cache needs 12 x 3 x 64 x 64."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user and mount namespaces) is not allowed here")
    samples = images(tmp_path / "img", 12)
    np.save(tmp_path / "paths.npy", samples.paths)
    code = f"""
import numpy as np
from datasets.cache import open_cache
from datasets.folder import Samples
from datasets.transforms import Decoder
from distrib.context import DistContext
from distrib.errors import LaunchError
paths = np.load({str(tmp_path / "paths.npy")!r})
try:
    open_cache(DistContext(), [Samples(paths, np.zeros(len(paths), dtype=np.int64), ("a",))],
               {str(tmp_path / "small" / "c")!r}, Decoder((64, 64)))
except LaunchError as e:
    print(e)
"""
    (tmp_path / "small").mkdir()
    (tmp_path / "try.py").write_text(code)
    small = tmp_path / "small"
    run = f"{sys.executable} {tmp_path / 'try.py'}"
    script = f"mount -t tmpfs -o size=64k tmpfs {small} && {run} && ls -A {small / 'c'}"  # the folder only
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                         env=clean_env(PYTHONPATH=str(REPO)), timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    message, listing = res.stdout.split("\n", 1)[0], res.stdout.split("\n", 1)[1]
    assert "the decoded cache for 12 image(s) of 64x64 needs 144 kB more in" in message, message
    assert "which has 64 kB free" in message, message
    assert "free space there, set data.cache_dir to a bigger disk, set a smaller data.resize" in message
    assert listing.strip() == "", f"something was written: {listing}"


def test_the_cache_command_fills_every_image_and_a_rerun_decodes_none(tmp_path: Path) -> None:
    from datasets.synthetic import write_synthetic

    write_synthetic(tmp_path / "src", classes=2, per_class=6, size=16, seed=3)
    src = tmp_path / "src"
    out = tmp_path / "c"
    sets = [f"data.csv={src / 'labels.csv'}", f"data.images={src / 'images'}", f"data.cache_dir={out}",
            "data.resize=[12, 12]", f"run.out_dir={tmp_path / 'runs'}"]  # fmt: skip
    cmd = ["cache", *(a for s in sets for a in ("--set", s))]
    first = launch(*cmd)
    assert first.returncode == 0, first.stderr
    assert "12 image(s) decoded in" in first.stderr and "0 were already there" in first.stderr, first.stderr
    again = launch(*cmd)
    assert "0 image(s) decoded in" in again.stderr and "12 were already there" in again.stderr, again.stderr
    (folder,) = (tmp_path / "c").glob("decoded-*")
    entries = np.fromfile(folder / "entries.i64", dtype=np.int64).reshape(-1, ENTRY)
    assert (entries[:, 0] == FILLED).all()


# ----------------------------------------------------------------------------- damage


def _filled_cache(tmp_path: Path, n: int = 6) -> tuple[Samples, Path, list[torch.Tensor]]:
    """A cache with every slot filled (in this process), its folder, and the true pixels."""
    samples = images(tmp_path / "img", n)
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))
    truth = [cache.get(i, p) for i, p in enumerate(samples.paths)]
    assert cache.filled() == n
    (folder,) = (tmp_path / "c").glob("decoded-*")
    return samples, folder, truth


def _reopened(tmp_path: Path, samples: Samples) -> list[torch.Tensor]:
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))
    return [cache.get(i, p) for i, p in enumerate(samples.paths)]


@pytest.mark.parametrize(
    "damage",
    ["pixels-half", "pixels-zero", "entries-half", "pixels-deleted", "entries-deleted", "meta-deleted",
     "meta-other", "paths-deleted"],
)  # fmt: skip
def test_a_damaged_cache_is_rebuilt_with_a_warning_never_read(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    samples, folder, truth = _filled_cache(tmp_path)
    name, how = damage.split("-")
    target = folder / {"pixels": "pixels.u8", "entries": "entries.i64", "meta": "meta.json",
                       "paths": "paths.npy"}[name]  # fmt: skip
    if how == "deleted":
        target.unlink()
    elif how == "other":
        target.write_text('{"format": 2, "count": 6, "shape": [3, 8, 8], "decoder": "x"}')
    else:
        os.truncate(target, target.stat().st_size // 2 if how == "half" else 0)
    with caplog.at_level("WARNING", logger="datasets.cache"):
        again = _reopened(tmp_path, samples)
    assert all(torch.equal(a, b) for a, b in zip(again, truth, strict=True))
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and str(target) in warned[0], caplog.text
    assert "building it again" in warned[0]
    assert (folder / "pixels.u8").stat().st_size == 6 * 3 * 16 * 16  # rebuilt to its full size
    assert not list((tmp_path / "c").glob(".*")), "the damaged copy was left behind"


def test_overwritten_pixels_fail_their_checksum_and_are_decoded_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    samples, folder, truth = _filled_cache(tmp_path)
    slot = 3 * 16 * 16
    with open(folder / "pixels.u8", "r+b") as fh:  # bytes overwritten in slots 2 (one byte) and 4 (a run)
        fh.seek(2 * slot + 100)
        fh.write(bytes([(int(truth[2].reshape(-1)[100]) + 1) % 256]))
        fh.seek(4 * slot + 10)
        fh.write(b"\0" * 300)
    with caplog.at_level("WARNING", logger="datasets.cache"):
        again = _reopened(tmp_path, samples)
    assert all(torch.equal(a, b) for a, b in zip(again, truth, strict=True))
    assert "fail their checksum" in caplog.text and "img002" in caplog.text, caplog.text
    fresh = DecodedCache(plan_cache([samples], tmp_path / "c", Decoder((16, 16))))
    assert all(fresh.current(i) for i in range(6)), "the damaged slots were not written back"


def test_swapped_blocks_change_the_checksum() -> None:
    from datasets.cache import checksum

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 17), dtype=np.uint8)  # 816 bytes: a tail of 0 words, odd sizes below
    b = a.copy().reshape(-1)
    b[:8], b[8:16] = a.reshape(-1)[8:16], a.reshape(-1)[:8]  # the plain sum is unchanged
    assert checksum(a) != checksum(b.reshape(a.shape))
    c = rng.integers(0, 256, (3, 5, 5), dtype=np.uint8)  # 75 bytes: 9 words and a 3-byte tail
    d = c.copy()
    d[2, 4, 4] ^= 1
    assert checksum(c) != checksum(d)
    assert checksum(c) == checksum(c.copy())


def test_a_cache_file_cut_while_a_job_runs_is_one_line_not_zeros(tmp_path: Path) -> None:
    samples, folder, _ = _filled_cache(tmp_path)
    os.truncate(folder / "pixels.u8", 100)
    late = DecodedCache(plan_cache([samples], tmp_path / "c", Decoder((16, 16))))  # a worker opening it now
    with pytest.raises(LaunchError, match=r"pixels.u8 holds 100 bytes, not 4,608: it was changed") as e:
        late.get(0, samples.paths[0])
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    assert (folder / "pixels.u8").stat().st_size == 100, "the map grew the file back"


def test_a_pixel_write_that_fails_midway_leaves_the_slot_unflagged(tmp_path: Path) -> None:
    """The order a killed writer relies on, made deterministic: the pixel write stops halfway (as a
    SIGKILL or a full disk would), so the slot's flag must still say EMPTY (it is set last)."""
    samples = images(tmp_path / "img", 3)
    cache = open_cache(DistContext(), [samples], tmp_path / "c", Decoder((16, 16)))
    pixels, entries = cache._open()

    class HalfWrite:
        def __getitem__(self, key):  # noqa: ANN001, ANN204
            return pixels[key]

        def __setitem__(self, key, value) -> None:  # noqa: ANN001
            pixels[key][:, :8] = value[:, :8]  # half the rows land, then the write dies
            raise OSError(28, "No space left on device")

    cache._pixels = HalfWrite()  # type: ignore[assignment]
    with pytest.raises(OSError):
        cache.get(1, samples.paths[1])
    assert entries[1, 0] == EMPTY, "the slot was flagged before its pixels were complete"
    cache._pixels = pixels
    assert torch.equal(cache.get(1, samples.paths[1]), Decoder((16, 16))(samples.paths[1]))
    assert entries[1, 0] == FILLED
