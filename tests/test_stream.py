"""Streaming (crlf.engine.sources.feed and .stream) and the tar source: order, resume, shares, corrupt files, crops."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import run_crlf
from PIL import Image, ImageOps
from safetensors.torch import load_file

from crlf import PretrainSettings, pretrain
from crlf.engine import augment, methods
from crlf.engine.sources import catalog, feed, images, load
from crlf.engine.sources.feed import StreamFeed
from crlf.engine.sources.images import crop_boxes, decode_crops
from crlf.engine.sources.stream import Decoder
from crlf.engine.sources.tar import expand_braces
from crlf.errors import InputError, Interrupted
from crlf.options import AugmentSettings, DataSettings

PLAN = [(8, 0.2, 1.0), (8, 0.2, 1.0)]


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """3 shards of 8 samples (24): key k has a JPEG of 20-34 x 24 px and a .cls label k % 3; classes.txt names 3."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        with tarfile.open(folder / f"part-{s:03d}.tar", "w") as tar:
            for k in range(8 * s, 8 * s + 8):
                for ext, data in (("jpg", _jpeg(rng, 20 + k % 15, 24)), ("cls", str(k % 3).encode())):
                    info = tarfile.TarInfo(f"{k:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "classes.txt").write_text("zero\none\ntwo\n")
    return folder


def _mapped_file(address: int) -> str:
    """The file mapped at `address` in this process ('' for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return rest[-1] if len(rest) == 5 else ""
    return ""


def _train(out: Path, data_dir: Path, **kw):
    values = dict(data="tar", data_dir=data_dir, image_size=8, batch_size=8, epochs=2, device="cpu", head_hidden=32,
                  head_out=16, lr=0.1, out=out, stream=True, workers=0)  # fmt: skip
    return PretrainSettings(**{**values, **kw})


def _seen(monkeypatch) -> list[tuple[int, int]]:
    """Record every (epoch, image index) the stream decodes."""
    seen: list[tuple[int, int]] = []
    real = Decoder.__getitems__
    monkeypatch.setattr(Decoder, "__getitems__", lambda self, items: seen.extend(items) or real(self, items))
    return seen


def test_tar_listing_labels_class_names_and_patterns(shards):
    listed = catalog(DataSettings(data="tar", data_dir=shards))
    assert len(listed) == 24 and listed.ids[:2] == ["part-000/0000", "part-000/0001"]
    assert listed.labels.tolist() == [k % 3 for k in range(24)] and listed.class_names == ["zero", "one", "two"]
    braces = catalog(DataSettings(data="tar", data_dir=shards / "part-{000..001}.tar"))
    assert braces.ids == listed.ids[:16]
    assert catalog(DataSettings(data="tar", data_dir=shards / "part-*.tar")).ids == listed.ids
    assert expand_braces("a-{08..10}-{x,y}.tar") == ["a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar",
                                                     "a-10-x.tar", "a-10-y.tar"]  # fmt: skip
    with pytest.raises(InputError, match="names no shard"):
        catalog(DataSettings(data="tar", data_dir=shards / "part-{000..005}.tar"))


def test_tar_in_memory_equals_the_same_images_in_a_folder_and_is_memory_mapped(shards, tmp_path):
    in_memory = load(DataSettings(data="tar", data_dir=shards, image_size=8, cache_dir=tmp_path / "c"))
    root = tmp_path / "folder"
    root.mkdir()
    with tarfile.open(shards / "part-000.tar") as tar:
        tar.extractall(root, filter="data")
    (root / "0000.cls").unlink()
    for p in root.glob("*.cls"):
        p.unlink()
    folder = load(DataSettings(data="folder", data_dir=root, image_size=8, cache_dir=tmp_path / "c"))
    assert torch.equal(in_memory.images[:8], folder.images) and in_memory.labels[:8].tolist() == [0, 1, 2] * 2 + [0, 1]
    again = load(DataSettings(data="tar", data_dir=shards, image_size=8, cache_dir=tmp_path / "c"))
    assert _mapped_file(again.images.data_ptr()).endswith(".npy")  # read through the memory-mapped cache
    assert torch.equal(again.images, in_memory.images)


def test_same_seed_same_images_in_the_same_order_and_crops(shards):
    listed = catalog(DataSettings(data="tar", data_dir=shards))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    runs = []
    for _ in range(2):
        stream = StreamFeed(listed, 8, PLAN, seed=3, device=torch.device("cpu"), workers=0)
        runs.append([c.views for c in stream.batches(0, perm, 0, 3, 8, 0, 8)])
        assert stream.sampler.batches == [[(0, i) for i in perm[8 * k : 8 * k + 8].tolist()] for k in range(3)]
    assert all(torch.equal(a, b) for x, y in zip(*runs) for a, b in zip(x, y))
    other_epoch = [c.views for c in stream.batches(1, perm, 0, 3, 8, 0, 8)]
    assert not torch.equal(other_epoch[0][0], runs[0][0][0])  # the crops follow (seed, epoch, image)


def test_two_ranks_read_disjoint_shares_that_cover_the_epoch_like_the_in_memory_rows(shards):
    listed = catalog(DataSettings(data="tar", data_dir=shards))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    memory = feed.MemoryFeed(load(DataSettings(data="tar", data_dir=shards, image_size=8)), torch.device("cpu"))
    shares = []
    for rank in range(2):
        stream = StreamFeed(listed, 8, PLAN, seed=0, device=torch.device("cpu"), workers=0)
        list(stream.batches(0, perm, 0, 3, 8, rank, 4))
        shares.append([i for batch in stream.sampler.batches for _, i in batch])
        batches = torch.cat(list(memory.batches(0, perm, 0, 3, 8, rank, 4)))
        rows = [int((memory.images == b).flatten(1).all(1).nonzero()[0]) for b in batches]
        assert rows == shares[-1]
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(24))


def _pretrain_rank(rank: int, port: int, shards: Path, out: Path) -> None:
    """One of two processes of a streamed pretraining run over gloo: records the (epoch, image) pairs it decodes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    seen: list[tuple[int, int]] = []
    real = Decoder.__getitems__
    Decoder.__getitems__ = lambda self, items: seen.extend(items) or real(self, items)
    pretrain(_train(out / "run", shards, epochs=2, seed=7))
    (out / f"seen.{rank}.json").write_text(json.dumps(seen))


def test_two_processes_read_disjoint_shares_that_cover_every_epoch(shards, tmp_path, monkeypatch):
    """A real two-process run (torch.multiprocessing, gloo), as torchrun starts it: per epoch, the ranks decode
    disjoint halves of the data set, together all of it, and the next epoch in another order."""
    import socket

    import torch.multiprocessing as mp

    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_pretrain_rank, args=(port, shards, tmp_path), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"seen.{rank}.json").read_text()) for rank in range(2)]
    orders = []
    for epoch in range(2):
        halves = [[i for e, i in ranks if e == epoch] for ranks in seen]
        assert len(halves[0]) == len(halves[1]) == 12 and not set(halves[0]) & set(halves[1])
        assert sorted(halves[0] + halves[1]) == list(range(24))
        orders.append(halves[0])
    assert orders[0] != orders[1]


def test_corrupt_members_are_skipped_counted_and_replaced_by_the_next(shards, tmp_path):
    path = shards / "part-001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == "0010.jpg":
                data = data[:40]  # a truncated JPEG
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    listed = catalog(DataSettings(data="tar", data_dir=shards))
    stream = StreamFeed(listed, 8, PLAN, seed=0, device=torch.device("cpu"), workers=0)
    perm = torch.arange(24)
    views = [c.views[0] for c in stream.batches(0, perm, 0, 3, 8, 0, 8)]
    assert [s.split(" (")[0] for s in stream.skipped()] == ["part-001/0010"] and stream.skipped() == []
    u = stream.decoder.uniforms(0, 10)  # row 10 holds image 11 cut with image 10's boxes
    expected = decode_crops(listed.read(11), ".jpg", PLAN, u)[0]
    assert torch.equal(views[1][2], expected)


def test_resume_mid_epoch_is_exact_and_sees_every_image_once(shards, tmp_path, monkeypatch, signal_at):
    seen = _seen(monkeypatch)
    pretrain(_train(tmp_path / "whole", shards, epochs=1))
    whole = list(seen)
    seen.clear()
    with pytest.raises(Interrupted):
        pretrain(_train(tmp_path / "cut", shards, epochs=1), signal_at(1, 1, signal.SIGTERM))
    assert seen == whole[:8]
    pretrain(_train(tmp_path / "cut", shards, epochs=1), resume=True)
    assert seen == whole and sorted(i for _, i in whole) == list(range(24))  # each image once, none repeated
    a, b = load_file(tmp_path / "whole" / "encoder.safetensors"), load_file(tmp_path / "cut" / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crop_statistics_match_the_in_memory_path():
    n, cfg = 4000, AugmentSettings(crop_min_scale=0.08)
    p = augment.sample_params(n, 32, 32, cfg, torch.Generator().manual_seed(0))
    memory_area, memory_ratio = (p.height * p.width / 32**2).numpy(), (p.width / p.height).numpy()
    u = np.random.default_rng(0).random((n, 4))
    boxes = crop_boxes(256, 256, [(224, 0.08, 1.0)] * n, u)  # a square full-resolution image
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, ratio = w * h / 256**2, w / h
    for ours, theirs in ((area, memory_area), (np.log(ratio), np.log(memory_ratio))):
        assert abs(ours.mean() - theirs.mean()) < 0.02 and abs(ours.std() - theirs.std()) < 0.02
        assert np.abs(np.quantile(ours, [0.1, 0.5, 0.9]) - np.quantile(theirs, [0.1, 0.5, 0.9])).max() < 0.04
    boxes = crop_boxes(500, 375, [(224, 0.08, 1.0)] * n, u)  # 4:3: every box inside, its area in range
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (500 * 375)
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6 and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= 500 + 1e-6).all() and (boxes[:, 3] <= 375 + 1e-6).all()


def test_crops_keep_every_augmentation_but_the_box_and_multi_crop_plans():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    cfg = augment.Augment(jitter_strength=0, grayscale_p=0, flip_p=1.0)
    a, b = augment.views(augment.Crops([x, x.flip(-1)]), cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(a, x.flip(-1).float() / 255) and torch.allclose(b, x.float() / 255)
    dino = methods.get("dino")
    recipe = dino.recipe(dino.Config(), augment.Augment(), 32)
    plan = recipe.crop_plan(32)
    assert plan[:2] == [(32, 0.2, 1.0)] * 2 and plan[2:] == [(16, *augment.LOCAL_SCALE)] * 4
    crops = augment.Crops([torch.zeros(2, 3, s, s, dtype=torch.uint8) for s, _, _ in plan])
    out = augment.draw(recipe, crops, torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in out] == [32, 32, 16, 16, 16, 16]


def test_auto_rule_streams_when_the_decoded_set_would_not_fit_and_says_why(shards, monkeypatch, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="crlf.engine"):
        monkeypatch.setattr(feed, "available_memory", lambda: 1000)
        streamed = feed.open_feed(DataSettings(data="tar", data_dir=shards, image_size=8, workers=0), cpu, PLAN, 0)
        monkeypatch.setattr(feed, "available_memory", lambda: 10**12)
        kept = feed.open_feed(DataSettings(data="tar", data_dir=shards, image_size=8, workers=0), cpu, PLAN, 0)
    assert isinstance(streamed, StreamFeed) and isinstance(kept, feed.MemoryFeed)
    assert "streaming from tar:" in caplog.text and "more than half of the 0.0 GB available" in caplog.text
    assert "data: in memory (24 images at 8 px" in caplog.text
    with pytest.raises(ValueError, match="--stream is for folder and tar data"):
        DataSettings(data="digits", stream=True)


@pytest.mark.parametrize("limited_first", [False, True])
def test_a_limit_neither_reads_nor_replaces_the_whole_splits_cache(shards, tmp_path, limited_first):
    """--limit on a listed source is a subset with a cache of its own: before the fix a limited run read the whole
    split's cached decode (training on every image), or left its subset where the whole split's decode belongs."""
    cpu = torch.device("cpu")
    whole, limited = ({"data": "tar", "data_dir": shards, "image_size": 8, "workers": 0, "cache_dir": tmp_path / "c",
                       "stream": None, "limit": n} for n in (None, 5))  # fmt: skip
    order = [limited, whole] if limited_first else [whole, limited]
    sizes = {id(o): len(feed.open_feed(DataSettings(**o), cpu, PLAN, 0)) for o in order}
    assert sizes[id(whole)] == 24 and sizes[id(limited)] == 5
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2


def test_streaming_dino_with_spawned_workers_counts_a_corrupt_file(tmp_path, tiny_folder, caplog):
    (tiny_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        run = pretrain(_train(tmp_path / "dino", tiny_folder, data="folder", method="dino", local_size=4, workers=2,
                              epochs=1, batch_size=30, head_hidden=16, head_out=8, prototypes=16))  # fmt: skip
    assert run["status"] == "trained" and (Path(run["run_dir"]) / "encoder.safetensors").is_file()
    metrics = json.loads((Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["skipped_images"] == 1 and "skipped 1 unreadable image in epoch 1" in caplog.text
    assert "cat/broken.jpg (" in caplog.text


# --- embedding streamed: extract, the evaluations and visualize --------------------------------------------------
def _extract(ckpt: Path, out: Path, *args: object) -> dict:
    r = run_crlf("extract", "--ckpt", ckpt, "--out", out, "--device", "cpu", "--json", *args)
    assert r.returncode == 0, r.stderr
    return {"rows": np.load(out), "side": json.loads(Path(f"{out}.json").read_text()), "log": r.stderr}


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_extract_streamed_gives_the_in_memory_rows_ids_labels_and_skips(kind, reference_run, tiny_folder, shards,
                                                                        tmp_path):  # fmt: skip
    if kind == "folder":
        (tiny_folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # skipped, not replaced
        data = ["--data", "folder", "--data-dir", tiny_folder, "--workers", 1]  # one spawned decoding process
    else:
        data = ["--data", "tar", "--data-dir", shards, "--workers", 0, "--embed-batch-size", 10]
    ckpt = reference_run.path / "encoder.safetensors"
    streamed = _extract(ckpt, tmp_path / "s.npy", *data, "--stream")
    memory = _extract(ckpt, tmp_path / "m.npy", *data, "--no-stream")
    assert "data: streaming from" in streamed["log"] and "--stream" in streamed["log"]
    assert "data: in memory (--no-stream)" in memory["log"]
    assert np.array_equal(streamed["rows"], memory["rows"]) and len(memory["rows"]) == (60 if kind == "folder" else 24)
    for key in ("ids", "labels", "class_names", "image_size", "count"):
        assert streamed["side"][key] == memory["side"][key]
    if kind == "folder":
        assert "dog/broken.jpg" not in streamed["side"]["ids"]
        assert "skipped 1 of 61 files" in streamed["log"] and "dog/broken.jpg (" in streamed["log"]


def test_evaluations_and_visualize_stream_finetune_does_not(reference_run, tiny_folder, tmp_path):
    ckpt = reference_run.path / "encoder.safetensors"
    data = ["--ckpt", ckpt, "--data", "folder", "--data-dir", tiny_folder, "--test-data-dir", tiny_folder,
            "--device", "cpu", "--workers", 0, "--json"]  # fmt: skip
    results = []
    for stream in ("--stream", "--no-stream"):
        r = run_crlf("knn-eval", *data, stream, "--k", 5, "--results", tmp_path / f"knn{stream}.json")
        assert r.returncode == 0, r.stderr
        assert ("data: streaming from" in r.stderr) == (stream == "--stream")
        results.append(json.loads(r.stdout))
    assert results[0]["top1"] == results[1]["top1"] and results[0]["train_size"] == 60
    r = run_crlf("linear-eval", *data, "--stream", "--finetune", "--probe-epochs", 1)
    assert r.returncode == 2 and "--finetune trains on the images in memory" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_crlf("visualize", "--ckpt", ckpt, "--data", "folder", "--data-dir", tiny_folder, "--device", "cpu",
                 "--workers", 0, "--stream", "--kind", "pca", "--max-points", 40, "--out", tmp_path / "pca.png")
    assert r.returncode == 0, r.stderr
    assert "data: streaming from" in r.stderr and "streaming 40 images" in r.stderr and (tmp_path / "pca.png").is_file()


def test_cpu_stream_workers_run_the_recipe_seeded_by_epoch_and_batch(shards):
    listed = catalog(DataSettings(data="tar", data_dir=shards))
    simclr = methods.get("simclr")  # the default method: what the training loop hands a streaming source
    recipe = functools.partial(augment.draw, simclr.recipe(simclr.Config(), augment.Augment(), 8))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))

    def run(first: int = 0, epoch: int = 0) -> list[augment.Views]:
        stream = StreamFeed(listed, 8, PLAN, seed=3, device=torch.device("cpu"), workers=0, recipe=recipe)
        return list(stream.batches(epoch, perm, first, 3, 8, 0, 8))

    whole = run()
    assert all(isinstance(b, augment.Views) and b.views[0].dtype == torch.float32 for b in whole)
    assert [tuple(v.shape) for v in whole[0].views] == [(8, 3, 8, 8)] * 2
    resumed = run(first=1)  # a run resumed at step 1 augments exactly as the uninterrupted one
    assert all(torch.equal(a, b) for x, y in zip(whole[1:], resumed) for a, b in zip(x.views, y.views))
    assert not torch.equal(run(epoch=1)[0].views[0], whole[0].views[0])


@pytest.mark.parametrize(("cropped", "rows", "side"), [(True, 40, 48), (False, 40, 48), (True, 12, 224)])
def test_one_thread_chunked_colour_equals_the_whole_batch_passes(cropped, rows, side):
    """48 px: chunks of 37 rows with mixed masks; 224 px: one row per chunk, each op on or off for the whole chunk.
    Pre-cut views come in two parts (as repeat hands them over), read in place by the chunked path."""
    x = torch.randint(0, 256, (rows, 3, side, side), dtype=torch.uint8)
    cfg = AugmentSettings(jitter_p=0.5, grayscale_p=0.3, blur_p=0.5, solarize_p=0.2)
    p = augment.sample_params(rows, side, side, cfg, torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):  # one thread: chunked (streaming workers); more: whole-batch passes
            torch.set_num_threads(n)
            out.append(augment.apply(augment.Crops([x[:5], x[5:]]) if cropped else x, p, side))
    finally:
        torch.set_num_threads(threads)
    assert (out[0] - out[1]).abs().max() < 1e-5 and out[0].shape == (rows, 3, side, side)


def test_worker_buffers_are_in_shared_memory(monkeypatch):
    assert not augment.empty((2, 3), dtype=torch.float32).is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    x = augment.empty((2, 3), dtype=torch.uint8)
    assert x.is_shared() and x.shape == (2, 3) and x.dtype == torch.uint8 and x.is_contiguous()


def test_gpu_decode_leaves_turned_and_cmyk_jpegs_to_the_workers(tmp_path):
    """torchvision.io ignores the EXIF orientation on CUDA (its boxes, drawn on the upright size, would cut the
    stored pixels): with --gpu-decode, only RGB and gray JPEGs stored upright go to the device; a turned or a CMYK
    JPEG is decoded in the worker, to the crops the CPU path gives."""
    turned = Image.Exif()
    turned[0x0112] = 6
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    for name, mode, extra in (("rgb", "RGB", {}), ("gray", "L", {}), ("turned", "RGB", {"exif": turned}),
                              ("cmyk", "CMYK", {})):  # fmt: skip
        Image.fromarray(pixels).convert(mode).save(tmp_path / "a" / f"{name}.jpg", quality=90, **extra)
    listed = catalog(DataSettings(data="folder", data_dir=tmp_path))
    items = [(0, i) for i in range(len(listed))]
    device, cpu = (Decoder(listed, PLAN, 0, gpu).__getitems__(items) for gpu in (True, False))
    assert sorted(listed.ids[row] for row, _, _ in device["jpegs"]) == ["a/gray.jpg", "a/rgb.jpg"]
    for row in (listed.ids.index("a/turned.jpg"), listed.ids.index("a/cmyk.jpg")):
        assert all(torch.equal(d[row], c[row]) for d, c in zip(device["views"], cpu["views"]))
        assert cpu["views"][0][row].float().std() > 10


def test_torchvision_and_pillow_decode_jpegs_to_the_same_crops(tmp_path, monkeypatch):
    """Full-scale RGB and gray JPEGs (an EXIF-turned one too) go to torchvision.io, CMYK and reduced-scale ones to
    Pillow: the crops equal Pillow's upright pixels cut with the same boxes."""
    calls = []
    original = images._torchvision_jpeg
    monkeypatch.setattr(images, "_torchvision_jpeg", lambda data: calls.append(1) or original(data))
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))  # 60 x 80
    turned = Image.Exif()
    turned[0x0112] = 6
    cases = {"rgb": ("RGB", {}, 1), "gray": ("L", {}, 1), "exif": ("RGB", {"exif": turned}, 1), "cmyk": ("CMYK", {}, 0)}
    for name, (mode, extra, expected_calls) in cases.items():
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=90, **extra)
        data, u, plan = out.getvalue(), rng.random((2, 4)), [(48, 0.3, 1.0), (32, 0.5, 1.0)]
        with Image.open(io.BytesIO(data)) as im:
            upright = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
        calls.clear()
        crops = decode_crops(data, ".jpg", plan, u)
        boxes = crop_boxes(upright.shape[2], upright.shape[1], plan, u)
        assert len(calls) == expected_calls, name
        assert all(torch.equal(c, images.cut_box(upright, b, p[0])) for c, b, p in zip(crops, boxes, plan)), name
    calls.clear()
    assert decode_crops(data, ".jpg", [(8, 0.9, 1.0)] * 2, u)[0].shape == (3, 8, 8) and not calls  # DCT-reduced


# --- skipped images and members are named, never a Python repr ---------------------------------------------------
@pytest.mark.parametrize("path", ["cache", "stream", "squares"])
def test_an_unreadable_image_is_named_by_its_id_without_a_python_repr(path, tmp_path, caplog):
    """Pillow's 'cannot identify image file <_io.BytesIO object at 0x7f...>' reached the skip warnings as it was."""
    from crlf.engine.sources.squares import SquareStream

    root = tmp_path / "f"
    root.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "good.png")
    (root / "broken.png").write_bytes(b"not a png")
    settings = DataSettings(data="folder", data_dir=root, image_size=8, cache_dir=tmp_path / "c", workers=0)
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        if path == "cache":
            load(settings)
        elif path == "squares":
            list(SquareStream(catalog(settings), 8, 4, workers=0))
        else:
            stream = StreamFeed(catalog(settings), 8, PLAN, seed=0, device=torch.device("cpu"), workers=0)
            list(stream.batches(0, torch.arange(2), 0, 1, 2, 0, 2))
            caplog.records.clear()
            logging.getLogger("crlf.engine").warning("%s", ", ".join(stream.skipped()))
    text = caplog.records[-1].getMessage()
    assert "broken.png (cannot identify image file)" in text and "0x" not in text and "<" not in text, text


def _odd_members_shard(path: Path) -> None:
    """One good sample (0000), then a member of every kind that is not a regular file (each named like an image), a
    folder and a file without an extension."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        data = _jpeg(np.random.default_rng(0), 16, 16)
        info = tarfile.TarInfo("0000.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        kinds = {"sub": tarfile.DIRTYPE, "1000.jpg": tarfile.SYMTYPE, "1001.jpg": tarfile.LNKTYPE,
                 "1002.jpg": tarfile.CHRTYPE, "1003.jpg": tarfile.BLKTYPE, "1004.jpg": tarfile.FIFOTYPE,
                 "1006.jpg": tarfile.GNUTYPE_SPARSE}  # fmt: skip
        for name, kind in kinds.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "0000.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
        info = tarfile.TarInfo("1005")  # a regular file without an extension: no key, no sample
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


def test_tar_members_that_are_not_regular_files_are_skipped_named_and_never_followed(tmp_path, caplog):
    """Links, devices and FIFOs in a shard vanished uncounted; a link member is never followed (1000 and 1001 point
    at 0000.jpg but are no samples). Directories are the shard's structure, not samples: not counted."""
    shard = tmp_path / "odd.tar"
    _odd_members_shard(shard)
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        got = load(DataSettings(data="tar", data_dir=shard, image_size=8, cache_dir=tmp_path / "c"))
    assert got.ids == ["odd/0000"]
    text = caplog.records[-1].getMessage()
    assert "skipped 7 of 8 files" in text and "odd/1000.jpg (a symbolic link)" in text, text
    listed = catalog(DataSettings(data="tar", data_dir=shard))
    assert listed.skipped == ["odd/1000.jpg (a symbolic link)", "odd/1001.jpg (a hard link)",
                              "odd/1002.jpg (a device)", "odd/1003.jpg (a device)", "odd/1004.jpg (a FIFO)",
                              "odd/1006.jpg (a sparse file)", "odd/1005 (no extension)"]  # fmt: skip
