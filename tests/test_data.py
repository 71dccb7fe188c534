"""crlf.engine.data: every source -> ImageSet, limit / image_size, folder decoding and cache, and the error messages."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from crlf.engine import data, folder
from crlf.engine.data import ImageSet, load
from crlf.errors import InputError
from crlf.settings import DataSettings

settings = DataSettings


def assert_images(s: ImageSet, n: int, size: int) -> None:
    assert s.images.shape == (n, 3, size, size)
    assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
    assert len(s) == n and len(s.ids) == n


# --- digits / npy / npz ---------------------------------------------------------------------------


def test_digits_default_is_16px_three_channels_with_labels():
    s = load(settings())
    assert_images(s, 1438, 16)
    assert s.labels.dtype == torch.int64 and sorted(s.labels.unique().tolist()) == list(range(10))
    assert s.class_names == [str(i) for i in range(10)]
    assert s.ids[:5] == ["train/0", "train/1", "train/2", "train/3", "train/5"] and s.source == "digits:train"
    assert torch.equal(s.images[:, 0], s.images[:, 2])  # grey replicated
    assert s.images.max() == 255 and s.images.min() == 0


def test_digits_test_split_is_every_fifth_image_disjoint_from_train():
    train, test = load(settings()), load(settings(), split="test")
    assert_images(test, 359, 16)
    assert test.ids[:2] == ["test/4", "test/9"] and test.source == "digits:test"
    assert not {i.split("/")[1] for i in train.ids} & {i.split("/")[1] for i in test.ids}
    assert len(train) + len(test) == 1797
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    with pytest.raises(InputError, match="splits train .* and test"):
        load(settings(), split="unlabeled")


def test_limit_is_a_seeded_subset_in_original_order_and_image_size_resizes():
    s = load(settings(limit=100, image_size=16))
    assert_images(s, 100, 16)
    order = [int(i.split("/")[1]) for i in s.ids]
    assert order == sorted(order) and order != list(range(100))
    assert load(settings(limit=100, image_size=16)).ids == s.ids  # same seed, same subset
    full = load(settings())
    position = {id_: row for row, id_ in enumerate(full.ids)}
    assert torch.equal(s.labels, full.labels[[position[i] for i in s.ids]])


def test_npy_with_sibling_labels(tiny_npy):
    raw = np.load(tiny_npy)
    s = load(settings(data="npy", data_dir=tiny_npy))
    assert_images(s, 120, 16)
    assert torch.equal(s.images, torch.from_numpy(raw).permute(0, 3, 1, 2))
    assert s.labels.tolist() == [i % 4 for i in range(120)]
    assert s.class_names == ["0", "1", "2", "3"] and s.ids[5] == "train/5"


def test_npy_grayscale_without_labels_and_resize(tmp_path):
    path = tmp_path / "grey.npy"
    np.save(path, np.full((7, 10, 10), 200, np.uint8))
    s = load(settings(data="npy", data_dir=path, image_size=20))
    assert_images(s, 7, 20)
    assert s.labels is None and s.class_names == []
    assert (s.images == 200).all()  # a constant image stays constant through the resize


def test_npz_images_labels_and_class_names(tiny_npz):
    s = load(settings(data="npz", data_dir=tiny_npz, limit=10))
    assert_images(s, 10, 12)
    assert s.class_names == list("abcde")
    assert all(label == int(i.split("/")[1]) % 5 for label, i in zip(s.labels.tolist(), s.ids))


@pytest.mark.parametrize(
    ("array", "labels", "match"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), None, "must be uint8.*found float32"),
        (np.zeros((4, 8), np.uint8), None, r"expected images of shape.*found \(4, 8\)"),
        (np.zeros((4, 3, 8, 8), np.uint8), None, "channels-first"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.arange(3), "expected 4 integer labels.*shape \\(3,\\)"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.float64), "integer labels.*found float64"),
    ],
)
def test_npy_bad_arrays_are_input_errors(tmp_path, array, labels, match):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    if labels is not None:
        np.save(tmp_path / "bad.labels.npy", labels)
    with pytest.raises(InputError, match=match) as e:
        load(settings(data="npy", data_dir=path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_npy_missing_file_and_object_array(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load(settings(data="npy", data_dir=tmp_path / "nope.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read .*obj.npy"):
        load(settings(data="npy", data_dir=tmp_path / "obj.npy"))


def test_npz_without_images_key(tmp_path):
    np.savez(tmp_path / "a.npz", pixels=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="no 'images'.*pixels"):
        load(settings(data="npz", data_dir=tmp_path / "a.npz"))


# --- cifar / stl10 --------------------------------------------------------------------------------


def test_cifar10_train_and_test(tiny_cifar_root):
    s = load(settings(data="cifar10", data_dir=tiny_cifar_root, download=False))
    assert_images(s, 200, 32)
    assert (
        s.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        and s.source == "cifar10:train"
    )
    assert s.labels.tolist() == [i % 10 for i in range(40)] * 5
    assert s.images[41].unique().tolist() == [(2 * 40 + 1) % 256]  # batch 2, row 1
    t = load(settings(data="cifar10", data_dir=tiny_cifar_root / "cifar-10-batches-py", split="test", download=False))
    assert_images(t, 40, 32)
    assert t.ids[3] == "test/3" and t.images[3].unique().tolist() == [(6 * 40 + 3) % 256]


def test_cifar_tarball_is_extracted(tiny_cifar_root, tmp_path):
    root = tmp_path / "only_tar"
    root.mkdir()
    shutil.make_archive(str(root / "cifar-10-python"), "gztar", tiny_cifar_root, "cifar-10-batches-py")
    s = load(settings(data="cifar10", data_dir=root, download=False, split="test"))
    assert len(s) == 40 and (root / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(InputError, match=r"CIFAR-100 not found in .* downloads are off.*cifar-100-python.tar.gz"):
        load(settings(data="cifar100", data_dir=tmp_path, download=False))


def test_cifar_download_failure_gives_the_fix(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, root, filename=None, md5=None):
        Path(root, filename).write_bytes(b"partial")
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(InputError) as e:
        load(settings(data="cifar10", data_dir=tmp_path))
    msg = str(e.value)
    assert "CIFAR-10 not found" in msg and "download failed (" in msg and "name resolution" in msg
    assert "put cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ folder" in msg and "\n" not in msg
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()  # the partial download is removed


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(tiny_cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tiny_cifar_root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": []}, f)
    with pytest.raises(InputError, match="refusing to unpickle (posix|nt|os).system from .*data_batch_3"):
        load(settings(data="cifar10", data_dir=tiny_cifar_root))
    assert not (tmp_path / "pwned").exists()


def _py2_pickle_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the real (Python 2) CIFAR files are: numpy.core names and str array data."""

    def s(b: bytes) -> bytes:  # BINSTRING: what a Python 2 str becomes
        return b"T" + len(b).to_bytes(4, "little") + b

    dtype = (
        b"cnumpy\ndtype\n"
        + s(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    shape = b"(" + b"".join(b"J" + d.to_bytes(4, "little") for d in data.shape) + b"t"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R(K\x01"
        + shape
        + dtype
        + b"\x89"
        + s(data.tobytes())
        + b"tb"
    )
    return (
        b"\x80\x02}("
        + s(b"data")
        + array
        + s(b"labels")
        + b"]"
        + b"("
        + b"".join(b"K" + bytes([v]) for v in labels)
        + b"e"
        + b"u."
    )


def test_cifar_reads_python2_pickles(tiny_cifar_root):
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    (tiny_cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(_py2_pickle_batch(data, [7, 3]))
    s = load(settings(data="cifar10", data_dir=tiny_cifar_root, split="test"))
    assert s.labels.tolist() == [7, 3] and torch.equal(s.images, torch.from_numpy(data).reshape(2, 3, 32, 32))


def test_cifar_tarball_with_path_traversal_is_refused(tmp_path):
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname="../escaped.txt")
    with pytest.raises(InputError, match="cannot extract .*cifar-10-python.tar.gz"):
        load(settings(data="cifar10", data_dir=tmp_path, download=False))
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_cifar_corrupt_batch(tiny_cifar_root):
    (tiny_cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(InputError, match="cannot read .*test_batch"):
        load(settings(data="cifar10", data_dir=tiny_cifar_root, split="test"))


def test_stl10_transposition_labels_and_splits(tiny_stl10_root):
    kw = dict(data="stl10", data_dir=tiny_stl10_root, download=False)
    train = load(settings(**kw), split="train")
    assert_images(train, 10, 96)
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(96), torch.arange(96), indexing="ij")
    for i in (0, 7):
        assert torch.equal(train.images[i], ((i + c + y + 2 * x) % 256).to(torch.uint8))
    assert train.labels.tolist() == list(range(10)) and train.class_names[2] == "car"
    test = load(settings(**kw, split="test"))
    assert test.labels.tolist() == [9, 8, 7, 6, 5, 4] and test.images[0, 0, 0, 1] == 102
    both = load(settings(**kw))  # default: train+unlabeled
    assert len(both) == 18 and both.labels is None and both.class_names == [] and both.ids[10] == "unlabeled/0"
    some = load(settings(**kw, limit=5))
    assert len(some) == 5 and some.ids == [both.ids[i] for i in data.pick(18, 5).tolist()]
    assert torch.equal(some.images, both.images[data.pick(18, 5)])


# --- folders --------------------------------------------------------------------------------------


def test_folder_labels_from_class_subfolders(tiny_folder):
    s = load(settings(data="folder", data_dir=tiny_folder, image_size=24))
    assert_images(s, 60, 24)
    assert s.class_names == ["cat", "dog", "frog"]
    assert s.labels.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    assert "cat/img_1.jpg" in s.ids and "frog/img_0.png" in s.ids
    assert s.source == f"folder:{tiny_folder.resolve()}"
    row = s.ids.index("dog/img_0.png")  # the 16-bit image is scaled to 8 bit, not clipped to white
    assert 60 < s.images[row].float().mean() < 200


def test_folder_modes_and_crop(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(np.full((10, 30), 65535 // 2, np.uint16)).save(root / "grey16.png")
    Image.new("RGBA", (30, 10), (255, 0, 0, 0)).save(root / "clear.png")  # fully transparent -> white
    left = np.zeros((20, 40, 3), np.uint8)
    left[:, 5:35] = (0, 0, 255)  # the centre 20x20 (plus the resampling margin) is blue; the sides are cropped away
    Image.fromarray(left).save(root / "wide.png")
    Image.new("L", (8, 8), 77).convert("P").save(root / "pal.gif")
    s = load(settings(data="folder", data_dir=root, image_size=8))
    assert s.labels is None and s.class_names == []
    img = dict(zip(s.ids, s.images))
    assert img["grey16.png"].unique().tolist() == [127]
    assert img["clear.png"].unique().tolist() == [255]
    assert img["wide.png"][2].unique().tolist() == [255] and img["wide.png"][:2].max() == 0
    assert img["pal.gif"].unique().tolist() == [77]


def test_folder_exif_orientation_and_limit(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, 10:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: top half black, bottom half white
    Image.fromarray(pixels).save(root / "photo.jpg", exif=exif, quality=95)
    for i in range(5):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"plain_{i}.png")
    s = load(settings(data="folder", data_dir=root, image_size=8))
    photo = s.images[s.ids.index("photo.jpg")].float()
    assert photo[:, 0].mean() < 40 and photo[:, 7].mean() > 215
    some = load(settings(data="folder", data_dir=root, image_size=8, limit=3))
    assert some.ids == [s.ids[i] for i in data.pick(6, 3).tolist()]


def test_folder_skips_non_images_and_corrupt_files_with_one_warning(tiny_folder, caplog):
    (tiny_folder / "cat" / "notes.txt").write_text("hello")
    (tiny_folder / "dog" / "broken.png").write_bytes(b"not a png")
    (tiny_folder / ".DS_Store").write_bytes(b"ignored")
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        s = load(settings(data="folder", data_dir=tiny_folder, image_size=16))
    assert len(s) == 60
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 of 62 files" in warnings[0] and "cat/notes.txt" in warnings[0] and "dog/broken.png" in warnings[0]


def test_folder_split_subfolders(tiny_folder, tmp_path):
    root = tmp_path / "splits"
    shutil.copytree(tiny_folder, root / "train")
    shutil.copytree(tiny_folder / "dog", root / "test" / "dog")
    shutil.copytree(tiny_folder / "frog", root / "test" / "frog")
    train = load(settings(data="folder", data_dir=root, image_size=8))
    test = load(settings(data="folder", data_dir=root, image_size=8, split="test"))
    assert len(train) == 60 and train.ids[0].startswith("train/cat/")
    assert len(test) == 40 and test.class_names == ["dog", "frog"] and test.ids[0].startswith("test/dog/")
    with pytest.raises(InputError, match="no unlabeled/ sub-folder"):
        load(settings(data="folder", data_dir=root, split="unlabeled"))


def test_folder_cache_reused_then_invalidated(tiny_folder, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    kw = dict(data="folder", data_dir=tiny_folder, image_size=16, cache_dir=cache)
    first = load(settings(**kw))
    assert len(list(cache.glob("*.npz"))) == 1

    real_decode = folder._decode
    monkeypatch.setattr(folder, "_decode", lambda *a: pytest.fail("decoded although the cache is valid"))
    with caplog.at_level(logging.INFO, logger="crlf.engine"):
        again = load(settings(**kw))
    assert "using the cached decode" in caplog.text
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.ids == first.ids and again.class_names == first.class_names

    calls = []
    monkeypatch.setattr(folder, "_decode", lambda *a: calls.append(a) or real_decode(*a))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tiny_folder / "cat" / "new.png")
    changed = load(settings(**kw))
    assert len(changed) == 61 and len(calls) == 61
    assert len(list(cache.glob("*.npz"))) == 1  # the stale cache is replaced, not kept


def test_folder_unwritable_cache_warns_and_continues(tiny_folder, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        s = load(settings(data="folder", data_dir=tiny_folder, image_size=8, cache_dir=blocker / "sub"))
    assert len(s) == 60 and "cannot write the image cache" in caplog.text


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load(settings(data="folder", data_dir=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        load(settings(data="folder", data_dir=tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"nope")
    (tmp_path / "junk" / "b.csv").write_text("1,2")
    with pytest.raises(InputError, match="no readable images in .*junk"):
        load(settings(data="folder", data_dir=tmp_path / "junk"))
