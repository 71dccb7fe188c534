"""Shared fixtures: tiny data sets written to tmp dirs (never the network), and a private cache dir per test."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $XDG_CACHE_HOME at a fresh tmp dir so no test reads or writes ~/.cache."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


class ReferenceRun:
    """An uninterrupted tiny pretraining run, trained once per session, that interrupted, killed and resumed runs
    of the same settings must reproduce exactly. Read it, never write into it (copy it first)."""

    values = dict(  # 64 digits at 8 px, ResNet-18 with a small head (dropout: torch's RNG matters), 4 steps/epoch
        data="digits",
        limit=64,
        image_size=8,
        batch_size=16,
        head_hidden=32,
        head_out=16,
        head_dropout=0.1,
        device="cpu",
        lr=0.1,
        epochs=3,
    )

    def __init__(self, path: Path):
        self.path = path

    def settings(self, out: Path, **overrides):
        """PretrainSettings of the reference run writing to `out`."""
        from crlf import PretrainSettings

        return PretrainSettings(**{**self.values, "out": out, **overrides})

    def args(self) -> list[str]:
        """The same settings as `crlf pretrain` flags (without --out)."""
        return [part for k, v in self.values.items() for part in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """The session's ReferenceRun (trained in-process on the first use)."""
    from crlf import pretrain

    ref = ReferenceRun(tmp_path_factory.mktemp("reference") / "run")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("CRLF_")]:
            mp.delenv(key)
        pretrain(ref.settings(ref.path))
    return ref


def copy_run(src: Path, dst: Path, ignore=None) -> Path:
    """shutil.copytree of a run directory whose .safetensors files are hard links: crlf replaces those by rename,
    never writes into them, so the copy can be changed freely without 100s of MB written per copy; the files crlf
    appends to (metrics.jsonl, train.log, .lock) are real copies, as crlf refuses linked ones."""
    import shutil

    def copy(a: str, b: str) -> None:
        os.link(a, b) if a.endswith(".safetensors") else shutil.copy2(a, b)

    return Path(shutil.copytree(src, dst, ignore=ignore, copy_function=copy))


class SignalAt:
    """A reporter that sends this process `sig` after step `step` of epoch `epoch` (1-based), as `kill` would; step 0:
    once the epoch's metrics are recorded (between two epochs)."""

    def __init__(self, epoch: int, step: int, sig: int):
        self.when, self.sig = (epoch, step), sig

    def on_start(self, info):
        pass

    def on_step(self, epoch, step, steps, **running):
        if (epoch + 1, step) == self.when:
            os.kill(os.getpid(), self.sig)

    def on_epoch(self, metrics):
        if (metrics["epoch"], 0) == self.when:
            os.kill(os.getpid(), self.sig)


@pytest.fixture
def signal_at() -> type[SignalAt]:
    """SignalAt(epoch, step, sig): a reporter that stops a run mid-epoch as SIGINT / SIGTERM from outside would."""
    return SignalAt


@pytest.fixture(autouse=True)
def _crlf_logger_restored():
    """In-process CLI calls route the 'crlf' logger to the console and stop it propagating: put it back after each
    test, so that caplog sees crlf's warnings whatever test ran before."""
    logger = logging.getLogger("crlf")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """An image folder with class sub-folders 'cat', 'dog', 'frog' (labels 0, 1, 2), 20 images each (60 in all).

    Sizes vary (20x30, 40x40, 30x20, 17x25 ...), formats are PNG and JPEG, and the modes are mixed:
    each class holds RGB, grayscale 'L', 'RGBA', palette 'P' and one 16-bit grayscale 'I;16' PNG.
    Image k of a class is named ``img_k.png`` / ``img_k.jpg``; pixels are random (seed 0).
    """
    root = tmp_path / "tiny_folder"
    rng = np.random.default_rng(0)
    sizes = [(20, 30), (40, 40), (30, 20), (17, 25), (64, 48)]
    for name in ("cat", "dog", "frog"):
        (root / name).mkdir(parents=True)
        for k in range(20):
            w, h = sizes[k % len(sizes)]
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mode = ["RGB", "L", "RGBA", "P", "RGB"][k % 5] if k else "I;16"
            if mode == "I;16":
                im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
            elif mode == "RGBA":
                im = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)]))
            else:
                im = Image.fromarray(rgb).convert(mode)
            jpeg = k % 2 == 1 and mode in ("RGB", "L")
            im.save(root / name / f"img_{k}.{'jpg' if jpeg else 'png'}")
    return root


@pytest.fixture
def tiny_npy(tmp_path: Path) -> Path:
    """``images.npy``: (120, 16, 16, 3) uint8 random pixels, with ``images.labels.npy``: int64 labels i % 4
    (4 classes)."""
    path = tmp_path / "images.npy"
    rng = np.random.default_rng(1)
    np.save(path, rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "images.labels.npy", np.arange(120, dtype=np.int64) % 4)
    return path


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """``images.npz`` with 'images' (50, 12, 12, 3) uint8, 'labels' i % 5 and 'class_names'
    ['a', 'b', 'c', 'd', 'e']."""
    path = tmp_path / "images.npz"
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 12, 12, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(50) % 5, class_names=np.array(list("abcde")))
    return path


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def tiny_cifar_root(tmp_path: Path) -> Path:
    """A data root holding a fake ``cifar-10-batches-py/``: data_batch_1..5 (40 images each, 200 in all) and
    test_batch (40), pickled like the real ones; batches.meta has the 10 real class names.

    Image i of a batch has every pixel equal to (batch number * 40 + i) % 256 (test_batch: batch number 6),
    and label i % 10, so rows can be traced back to their batch and position.
    """
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], start=1):
        values = (b * 40 + np.arange(40)) % 256
        data = np.repeat(values.astype(np.uint8)[:, None], 3072, axis=1)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "batch_label": name,
                    "labels": [i % 10 for i in range(40)],
                    "data": data,
                    "filenames": [f"{i}.png" for i in range(40)],
                },
                f,
                protocol=2,
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": 40, "num_vis": 3072}, f, protocol=2)
    return tmp_path


@pytest.fixture
def tiny_cifar100_root(tmp_path: Path) -> Path:
    """A data root holding a fake ``cifar-100-python/``: ``train`` (30 images) and ``test`` (12), pickled like the real
    ones with 'fine_labels' and 'coarse_labels'; ``meta`` has 'fine_label_names' (``fine_00`` .. ``fine_99``) and
    'coarse_label_names' (``coarse_00`` .. ``coarse_19``).

    Image i has red = v, green = v + 1, blue = v + 2 everywhere, with v = 10 + i (train) or 100 + i (test); its fine
    label is 3 i % 100 (train) or 99 - i (test), its coarse label the fine one // 5, so reading the wrong key shows.
    """
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n, base, fine in (("train", 30, 10, lambda i: 3 * i % 100), ("test", 12, 100, lambda i: 99 - i)):
        v = base + np.arange(n, dtype=np.uint8)[:, None]
        data = np.concatenate([np.repeat(v + c, 1024, axis=1) for c in range(3)], axis=1).astype(np.uint8)
        labels = [fine(i) for i in range(n)]
        batch = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": name, "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump({**batch, "fine_labels": labels, "coarse_labels": [y // 5 for y in labels]}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        meta = {"fine_label_names": [f"fine_{k:02d}" for k in range(100)]}
        pickle.dump({**meta, "coarse_label_names": [f"coarse_{k:02d}" for k in range(20)]}, f, protocol=2)
    return tmp_path


@pytest.fixture
def tiny_stl10_root(tmp_path: Path) -> Path:
    """A data root holding a fake ``stl10_binary/``: 10 train, 6 test and 8 unlabeled images of 3x96x96, stored
    column-major like the real files; class_names.txt lists 10 names.

    Pixel (channel c, row y, column x) of image i is (i + c + y + 2 * x) % 256 in train and unlabeled and
    (i + c + y + 2 * x + 100) % 256 in test; train labels (1-based on disk) are i % 10 + 1, test labels 10 - i.
    """
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    c, y, x = np.meshgrid(np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    for part, n, shift in (("train", 10, 0), ("test", 6, 100), ("unlabeled", 8, 0)):
        images = np.stack([(i + c + y + 2 * x + shift) % 256 for i in range(n)]).astype(np.uint8)  # (n, 3, H, W)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{part}_X.bin")  # column-major within each channel
    (np.arange(10) % 10 + 1).astype(np.uint8).tofile(folder / "train_y.bin")
    (10 - np.arange(6)).astype(np.uint8).tofile(folder / "test_y.bin")
    (folder / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n"
    )
    return tmp_path
