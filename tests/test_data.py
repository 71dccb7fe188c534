"""crlf.engine.sources: every source -> ImageSet, limit / image_size, folder decoding and cache, error messages."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import stat
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from crlf.engine.sources import DataSpec, ImageSet, load, pick, request, split_of
from crlf.engine.sources import cache as folder_cache
from crlf.engine.sources.images import decode, printable
from crlf.errors import InputError
from crlf.options import DataSettings

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


def test_cifar100_rows_fine_labels_and_names(tiny_cifar100_root):
    s = load(settings(data="cifar100", data_dir=tiny_cifar100_root, download=False))
    assert_images(s, 30, 32)
    assert s.source == "cifar100:train" and s.ids[:2] == ["train/0", "train/1"]
    assert s.class_names == [f"fine_{k:02d}" for k in range(100)]  # the fine names, not the 20 coarse ones
    assert s.labels.tolist() == [3 * i % 100 for i in range(30)]  # fine_labels, not coarse_labels
    for i in (0, 7, 29):  # row i is image i, its three planes in RGB order
        assert [s.images[i, c].unique().tolist() for c in range(3)] == [[10 + i], [11 + i], [12 + i]]
    t = load(settings(data="cifar100", data_dir=tiny_cifar100_root / "cifar-100-python", split="test", download=False))
    assert_images(t, 12, 32)
    assert t.labels.tolist() == [99 - i for i in range(12)] and t.ids[11] == "test/11"
    assert [t.images[11, c].unique().tolist() for c in range(3)] == [[111], [112], [113]]
    with pytest.raises(InputError, match="CIFAR-100 has the splits train and test"):
        load(settings(data="cifar100", data_dir=tiny_cifar100_root, split="unlabeled", download=False))


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
        load(settings(data="cifar10", data_dir=tmp_path / "data" / "c10"))
    msg = str(e.value)
    assert "CIFAR-10 not found" in msg and "download failed (" in msg and "name resolution" in msg
    assert "put cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ folder" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # the partial download is removed, and the folders made for it


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
    assert len(some) == 5 and some.ids == [both.ids[i] for i in pick(18, 5).tolist()]
    assert torch.equal(some.images, both.images[pick(18, 5)])



def test_data_spec_mirrors_the_data_settings_and_loads_the_same(tiny_stl10_root):
    """The data layer's DataSpec has the fields and defaults of the CLI's DataSettings, which the entry points copy."""
    fields = {f.name: f.default for f in dataclasses.fields(DataSpec)}
    assert fields == {name: f.default for name, f in DataSettings.model_fields.items()}
    kw = dict(data="stl10", data_dir=tiny_stl10_root, download=False, limit=5)
    spec = DataSpec(**kw)
    assert split_of(spec) == "train+unlabeled" and split_of(DataSpec()) == "train" and split_of(spec, "test") == "test"
    assert request(settings(**kw)).spec == spec
    a, b = load(spec), load(settings(**kw))
    assert a.ids == b.ids and torch.equal(a.images, b.images)

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
    assert some.ids == [s.ids[i] for i in pick(6, 3).tolist()]


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
    assert len(list(cache.glob("*.npy"))) == 1

    real_decode = decode
    monkeypatch.setattr(folder_cache, "decode", lambda *a: pytest.fail("decoded although the cache is valid"))
    with caplog.at_level(logging.INFO, logger="crlf.engine"):
        again = load(settings(**kw))
    assert "using the cached decode" in caplog.text
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.ids == first.ids and again.class_names == first.class_names

    calls = []
    monkeypatch.setattr(folder_cache, "decode", lambda *a: calls.append(a) or real_decode(*a))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tiny_folder / "cat" / "new.png")
    changed = load(settings(**kw))
    assert len(changed) == 61 and len(calls) == 61
    assert len(list(cache.glob("*.npy"))) == 1  # the stale cache is replaced, not kept


def _flip_last_byte(npy: Path) -> None:
    data = bytearray(npy.read_bytes())
    data[-1] ^= 1
    npy.write_bytes(bytes(data))


def _edit_sidecar(npy: Path, edit) -> None:
    side = npy.with_suffix(".json")
    side.write_text(json.dumps(edit(json.loads(side.read_text()))))


@pytest.mark.parametrize("damage,why", [
    (_flip_last_byte, "does not match its checksum"),
    (lambda npy: _edit_sidecar(npy, lambda m: {**m, "ids": m["ids"][::-1]}), "does not match its checksum"),
    (lambda npy: _edit_sidecar(npy, lambda m: {**m, "labels": m["labels"][::-1]}), "does not match its checksum"),
    (lambda npy: _edit_sidecar(npy, lambda m: {k: v for k, v in m.items() if k not in ("check", "chunks")}),
     "has no checksum (an older crlf wrote it)"),
])  # fmt: skip
def test_folder_cache_that_does_not_match_its_checksum_is_rebuilt_with_one_warning(tiny_folder, tmp_path, caplog,
                                                                                   damage, why):
    """The cache was trusted as it was: one flipped byte changed the rows, reversed ids named the wrong images."""
    kw = dict(data="folder", data_dir=tiny_folder, image_size=8, cache_dir=tmp_path / "c")
    first = load(settings(**kw))
    pixels = first.images.clone()  # the damage is written into the file `first` maps
    (npy,) = (tmp_path / "c").glob("*.npy")
    damage(npy)
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        again = load(settings(**kw))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{npy}" in warnings[0] and why in warnings[0] and "decoding again" in warnings[0]
    assert torch.equal(again.images, pixels) and again.ids == first.ids and torch.equal(again.labels, first.labels)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crlf.engine"):
        load(settings(**kw))  # rebuilt: intact again
    assert "using the cached decode" in caplog.text and "checked the cache's checksums" in caplog.text
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_folder_cache_files_get_0666_less_the_umask(tiny_folder, tmp_path):
    """The .npy was created by mkstemp, so 0600 whatever the umask."""
    (tiny_folder / "dog" / "broken.png").write_bytes(b"not a png")  # the rows are compacted into a second temp file
    old = os.umask(0o027)
    try:
        load(settings(data="folder", data_dir=tiny_folder, image_size=8, cache_dir=tmp_path / "c"))
    finally:
        os.umask(old)
    modes = {p.suffix: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "c").iterdir()}
    assert modes == {".npy": 0o640, ".json": 0o640}


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


# --- folders: awkward file names and links --------------------------------------------------------


def _odd_names_folder(root: Path) -> Path:
    """4 plain images, plus valid and invalid images whose names hold an undecodable byte or a newline."""
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(root / f"ok{i}.png")
    Image.new("RGB", (10, 10), (9, 9, 9)).save(os.fsencode(root) + b"/good\xff.png")
    Image.new("RGB", (10, 10), (8, 8, 8)).save(root / "new\nline.png")
    with open(os.fsencode(root) + b"/bad\xff.png", "wb") as f:  # a bytes path: the name is not UTF-8
        f.write(b"not a png")
    (root / "bad\nline.png").write_bytes(b"not a png")
    return root


def test_printable_names_are_one_utf8_line_and_distinct():
    assert printable("cat/img 1.png") == "cat/img 1.png"
    assert printable(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert printable("a\nb\tc\x1b[31m") == "a\\nb\\tc\\x1b[31m"
    assert printable("line\u2028sep") == "line\\xe2\\x80\\xa8sep"
    assert printable("bad\\xff.png") == "bad\\\\xff.png"  # a literal backslash never reads as an escape
    assert printable("it's 'quoted'\\", backslashes=False) == "it's 'quoted'\\"


def test_folder_undecodable_and_newline_names_are_escaped_in_ids_cache_and_warning(tmp_path, caplog):
    root = _odd_names_folder(tmp_path / "odd")
    for attempt in ("decoded", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="crlf.engine"):
            s = load(settings(data="folder", data_dir=root, image_size=8, cache_dir=tmp_path / "cache"))
        assert len(s) == 6, attempt
        assert "good\\xff.png" in s.ids and "new\\nline.png" in s.ids
        assert json.loads(json.dumps(s.ids, ensure_ascii=False).encode("utf-8")) == s.ids  # JSON sidecars
        assert all("\n" not in i for i in s.ids)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        warning.encode("utf-8")
        assert "\n" not in warning and "skipped 2 of 8 files" in warning
        assert "bad\\xff.png (" in warning and "bad\\nline.png (" in warning
    assert s.images[s.ids.index("good\\xff.png")].unique().tolist() == [9]


def test_folder_undecodable_class_folder_name(tmp_path):
    root = tmp_path / "classes"
    for name in (b"caf\xe9", b"plain"):
        os.makedirs(os.fsencode(root) + b"/" + name)
        Image.new("RGB", (6, 6)).save(os.fsencode(root) + b"/" + name + b"/x.png")
    s = load(settings(data="folder", data_dir=root, image_size=8, cache_dir=tmp_path / "cache"))
    assert s.class_names == ["caf\\xe9", "plain"] and s.ids == ["caf\\xe9/x.png", "plain/x.png"]


def test_pretrain_on_folder_with_odd_names_logs_the_warning_to_train_log(tmp_path, capsys):
    from crlf import PretrainSettings, pretrain

    root = _odd_names_folder(tmp_path / "odd")
    s = PretrainSettings(
        data="folder",
        data_dir=root,
        image_size=8,
        batch_size=6,
        epochs=1,
        head_hidden=16,
        head_out=8,
        device="cpu",
        out=tmp_path / "run",
        cache_dir=tmp_path / "cache",
    )
    assert pretrain(s)["status"] == "trained"
    lines = (tmp_path / "run" / "train.log").read_bytes().decode("utf-8").splitlines()
    (warning,) = [line for line in lines if "WARNING" in line]
    assert "skipped 2 of 8 files" in warning and "bad\\xff.png (" in warning and "bad\\nline.png (" in warning
    assert "Logging error" not in capsys.readouterr().err


def test_folder_links_loops_and_dangling_links_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "links"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (6, 6), (i, 0, 0)).save(root / cls / f"{i}.png")
    os.symlink("loop", root / "cat" / "loop")  # ln -s loop loop
    os.symlink("nowhere.png", root / "dog" / "dangling.png")
    os.symlink("..", root / "cat" / "up")  # a folder link back to an ancestor: a cycle
    os.symlink("cat", root / "kitten")  # a linked class folder is followed
    os.symlink("1.png", root / "dog" / "again.png")  # a linked file is followed
    for attempt in ("decoded", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="crlf.engine"):
            s = load(settings(data="folder", data_dir=root, image_size=8, cache_dir=tmp_path / "cache"))
        assert s.class_names == ["cat", "dog", "kitten"], attempt
        assert sorted(s.ids) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/again.png"] + [
            "kitten/0.png",
            "kitten/1.png",
        ]
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.endswith(
            "skipped 5 of 12 files in "
            f"{root} that are not readable images: cat/loop (symlink loop), cat/up (symlink loop), "
            "dog/dangling.png (broken link) and 2 more"
        )


def test_folder_of_only_broken_links_names_them(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    os.symlink("gone.png", root / "a.png")
    os.symlink("loop", root / "loop")
    with pytest.raises(InputError, match=r"no readable images in .*broken \(a.png \(broken link\), loop \(symlink"):
        load(settings(data="folder", data_dir=root))


def test_folder_scan_survives_an_entry_whose_stat_fails(tmp_path, monkeypatch, caplog):
    root = tmp_path / "flat"
    root.mkdir()
    for name in ("a.png", "b.png", "locked.png"):
        Image.new("RGB", (6, 6)).save(root / name)
    real_scandir = os.scandir

    class Entry:
        def __init__(self, entry):
            self._entry, self.name, self.path = entry, entry.name, entry.path

        def stat(self, *, follow_symlinks=True):  # os.DirEntry.stat's signature: shutil.rmtree passes the keyword
            if self.name == "locked.png":
                raise PermissionError(13, "Permission denied", self.path)
            return self._entry.stat(follow_symlinks=follow_symlinks)

        def __getattr__(self, name):
            return getattr(self._entry, name)

    class Scan:
        def __init__(self, path):
            self._it = real_scandir(path)

        def __enter__(self):
            return [Entry(e) for e in self._it.__enter__()]

        def __exit__(self, *exc):
            return self._it.__exit__(*exc)

    monkeypatch.setattr(os, "scandir", Scan)
    with caplog.at_level(logging.WARNING, logger="crlf.engine"):
        s = load(settings(data="folder", data_dir=root, image_size=8))
    assert s.ids == ["a.png", "b.png"]
    assert "skipped 1 of 3 files" in caplog.text and "locked.png (Permission denied)" in caplog.text


# --- arrays with a zero side, and labels bounded by the data --------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 0, 8, 3), (4, 8, 0, 3), (4, 0, 8), (2, 0, 0, 1)])
def test_npy_images_with_a_zero_side_are_input_errors(tmp_path, shape):
    path = tmp_path / "zero.npy"
    np.save(path, np.zeros(shape, np.uint8))
    with pytest.raises(InputError, match="have no pixels"):
        load(settings(data="npy", data_dir=path))


def _npy_with_labels(tmp_path: Path, labels: np.ndarray) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((len(labels), 8, 8, 3), np.uint8))
    np.save(tmp_path / "x.labels.npy", labels)
    return path


@pytest.mark.parametrize(
    "labels,fragment",
    [
        (np.array([0, 1, 2, 20_000_000]), "labels go up to 20,000,000 for 4 rows"),  # took 2.6 GB of names
        (np.array([0, 1, 1000]), "labels go up to 1,000 for 3 rows"),
        (np.array([0, 2**63 + 1], np.uint64), "labels go up to"),  # not wrapped to a negative int64
    ],
)
def test_labels_without_names_are_bounded_by_the_data(tmp_path, labels, fragment):
    with pytest.raises(InputError) as info:
        load(settings(data="npy", data_dir=_npy_with_labels(tmp_path, labels)))
    assert fragment in str(info.value) and "class indices" in str(info.value)


def test_sparse_labels_below_the_bound_are_kept(tmp_path):
    s = load(settings(data="npy", data_dir=_npy_with_labels(tmp_path, np.array([0, 999]))))  # 2 rows, classes < 1000
    assert s.labels.tolist() == [0, 999] and len(s.class_names) == 1000
    s = load(settings(data="npy", data_dir=_npy_with_labels(tmp_path, np.arange(1500) % 1500)))  # as many as rows
    assert len(s.class_names) == 1500


def test_npz_labels_must_index_the_class_names(tmp_path):
    path = tmp_path / "x.npz"
    images, names = np.zeros((4, 8, 8, 3), np.uint8), np.array(list("abc"))
    np.savez(path, images=images, labels=np.array([0, 1, 2, 5]), class_names=names)
    with pytest.raises(InputError, match="3 class_names but labels up to 5"):
        load(settings(data="npz", data_dir=path))


def test_cifar_labels_that_are_not_integers(tiny_cifar_root):
    batch = tiny_cifar_root / "cifar-10-batches-py" / "test_batch"
    with open(batch, "rb") as f:
        original = pickle.load(f, encoding="latin1")
    for labels, data_rows, fragment in [
        (["cat"] * 40, original["data"], "are not 40 integers"),
        ([0.5] * 40, original["data"], "are not 40 integers"),
        ([0, 1], original["data"], "is not a CIFAR-10 batch"),
    ]:
        with open(batch, "wb") as f:
            pickle.dump({**original, "labels": labels, "data": data_rows}, f, protocol=2)
        with pytest.raises(InputError, match=fragment):
            load(settings(data="cifar10", data_dir=tiny_cifar_root, split="test"))


def test_folder_cache_with_bad_arrays_is_a_miss(tmp_path, caplog):
    for images, labels in (
        (np.zeros((2, 3, 0, 8), np.uint8), [0, 1]),
        (np.zeros((2, 3, 8, 8), np.uint8), [0, 20_000_000]),
        (np.zeros((2, 3, 8, 8), np.float32), [0, 1]),
        (np.zeros((3, 3, 8, 8), np.uint8), [0, 1]),
    ):
        path = tmp_path / "cache.npy"
        np.save(path, images)
        sidecar = {"labels": labels, "class_names": ["a", "b"], "ids": ["a/0", "b/0"], "skipped": []}
        path.with_suffix(".json").write_text(json.dumps(sidecar))
        with caplog.at_level(logging.WARNING, logger="crlf.engine"):
            assert folder_cache._read_cache(path, "folder:x") is None
        assert "ignoring the unreadable cache" in caplog.text


def _embeddings(tmp_path: Path, x: np.ndarray, **sidecar) -> Path:
    path = tmp_path / "emb.npy"
    np.save(path, x)
    (tmp_path / "emb.npy.json").write_text(json.dumps(sidecar))
    return path


@pytest.mark.parametrize(
    "x,sidecar,fragment",
    [
        (np.zeros((4, 0), np.float32), {}, "N, D > 0"),
        (np.zeros((0, 8), np.float32), {}, "N, D > 0"),
        (np.zeros((3, 2), np.float32), {"labels": [0, 1, 20_000_000]}, "labels go up to 20,000,000 for 3 rows"),
        (np.zeros((3, 2), np.float32), {"labels": [0, 1, 3], "class_names": ["a", "b", "c"]}, "3 class_names"),
        (np.zeros((3, 2), np.float32), {"labels": ["a", "b", "c"]}, "integer labels"),
        (np.zeros((3, 2), np.float32), {"labels": [0.5, 1, 2]}, "integer labels"),
        (np.zeros((3, 2), np.float32), {"labels": 7}, "integer labels"),
        (np.zeros((3, 2), np.float32), {"labels": [0, -1, 2]}, "labels must be >= 0"),
        (np.zeros((3, 2), np.float32), {"labels": [0, 1, 2], "class_names": "abc"}, "class names"),
    ],
)
def test_read_embeddings_bad_arrays_and_labels(tmp_path, x, sidecar, fragment):
    from crlf.engine.embedfile import read_embeddings

    with pytest.raises(InputError) as info:
        read_embeddings(_embeddings(tmp_path, x, **sidecar))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_read_embeddings_labels_within_bounds(tmp_path):
    from crlf.engine.embedfile import read_embeddings

    x, y, names, _ = read_embeddings(_embeddings(tmp_path, np.ones((3, 2)), labels=[0, 2, 1], class_names=list("abc")))
    assert y.tolist() == [0, 2, 1] and names == ["a", "b", "c"] and x.dtype == torch.float32


def _die(rows: range) -> list[str | None]:
    os._exit(3)  # a decoding process that crashes (a decoder bug, the OOM killer)


@pytest.mark.parametrize("crash", [False, True])
def test_folder_decoded_by_processes_equals_threads_with_the_same_skips(tiny_folder, tmp_path, monkeypatch, caplog,
                                                                        crash):
    """Large folders are decoded by forked processes into the cache file (threads barely scale: Pillow's parsing
    holds the GIL); the cache is the threads' one, byte for byte, with the same skipped file; a crashed process
    falls back to threads."""
    (tiny_folder / "dog" / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(folder_cache, "_CHUNK", 7)  # several chunks and a short last one
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    got = {}
    for how, minimum in (("threads", 10**9), ("processes", 1)):
        monkeypatch.setattr(folder_cache, "PROCESS_MIN", minimum)
        if crash and how == "processes":
            monkeypatch.setattr(folder_cache, "_decode_chunk", _die)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crlf.engine"):
            got[how] = load(settings(data="folder", data_dir=tiny_folder, image_size=16, cache_dir=tmp_path / how))
        assert f"decoding 61 images from {tiny_folder} (2 {how})" in caplog.text
        assert "skipped 1 of 61 files" in caplog.text and "dog/broken.png" in caplog.text
    assert ("decoding process ended abruptly" in caplog.text) == crash
    assert got["processes"].ids == got["threads"].ids and len(got["threads"]) == 60
    assert torch.equal(got["processes"].images, got["threads"].images) and got["threads"].images.float().std() > 10
