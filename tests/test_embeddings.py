"""extract / linear-eval / knn-eval as a user runs them: files, provenance, stdout, results, bad input."""

import io
import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import run_crlf

import crlf as crlf_api
from crlf.engine import backbones
from crlf.engine.embedfile import read_embeddings
from crlf.engine.encoder import Encoder
from crlf.engine.evaluate import knn_classify
from crlf.engine.files import sha256
from crlf.errors import InputError
from crlf.options import DataSettings


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def crlf(*args):
    return run_crlf(*args, binary=True)


@pytest.fixture
def encoder_run(tmp_path):
    """A run directory holding an encoder (random ResNet-18 weights, CIFAR stem, 8 px input) and a config.json."""
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    spec = backbones.spec_for("resnet18", 8, "cifar")
    encoder = Encoder(backbones.build(spec), spec, [0.5] * 3, [0.25] * 3, 1, {"arch": "resnet18"})
    encoder.save(run / "encoder.safetensors")
    (run / "config.json").write_text("{}")
    return run


def test_extract_npy_with_sidecar(tmp_path, encoder_run, tiny_cifar_root):
    ckpt, out = encoder_run / "encoder.safetensors", tmp_path / "emb.npy"
    r = crlf(
        "extract",
        "--ckpt",
        ckpt,
        "--data",
        "cifar10",
        "--data-dir",
        tiny_cifar_root,
        "--split",
        "test",
        "--out",
        out,
        "--device",
        "cpu",
        "--json",
    )
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)
    assert summary["count"] == 40 and summary["dim"] == 512 and summary["labels"] is True
    x = np.load(out)
    assert x.dtype == np.float32 and x.shape == (40, 512)
    side = json.loads((tmp_path / "emb.npy.json").read_text())
    assert side["checkpoint_sha256"] == sha256(ckpt) and side["split"] == "test" and side["dim"] == 512
    assert side["ids"] == [f"test/{i}" for i in range(40)] and side["labels"] == [i % 10 for i in range(40)]
    assert side["mean"] == [0.5, 0.5, 0.5] and side["crlf_version"] and side["class_names"][0] == "airplane"


def test_embed_api_rows_follow_the_data_order(encoder_run, tiny_folder):
    """crlf.embed row i is the encoder's output for image i of the data set, whatever the batch it was in."""
    ckpt = encoder_run / "encoder.safetensors"
    emb = crlf_api.embed(ckpt, data="folder", data_dir=tiny_folder, device="cpu", embed_batch_size=7)
    images = crlf_api.load_data(DataSettings(data="folder", data_dir=tiny_folder, image_size=8))
    assert emb.ids == images.ids and torch.equal(emb.labels, images.labels) and emb.x.shape == (60, 512)
    assert emb.provenance["image_size"] == 8 and emb.provenance["checkpoint_sha256"] == sha256(ckpt)
    encoder = crlf_api.load_encoder(ckpt).backbone
    with torch.no_grad():
        for i in (0, 6, 7, 33, 59):  # batch starts, middles and the ragged end
            direct = encoder((images.images[i : i + 1].float() / 255 - 0.5) / 0.25)[0]
            assert torch.allclose(emb.x[i], direct, atol=1e-4), i
    assert not torch.allclose(emb.x[0], emb.x[1], atol=1e-3)
    with pytest.raises(InputError, match="needs --ckpt"):
        crlf_api.embed(None, data="digits")


def _one_line_error(fragment, call, *args, **kwargs):
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_embed_api_refuses_what_the_cli_refuses_in_one_line(encoder_run, tmp_path):
    from PIL import Image

    ckpt = encoder_run / "encoder.safetensors"
    encoder = crlf_api.load_encoder(ckpt)
    x = torch.rand(2, 3, 8, 8)
    _one_line_error("0x0 px has no pixels", encoder.embed, Image.new("RGB", (0, 0)))
    _one_line_error("5x0 px has no pixels", encoder.embed, [Image.new("RGB", (5, 0))])
    for bad in (float("nan"), float("inf")):
        _one_line_error("NaN or infinite", encoder.embed, torch.where(x > 0.5, bad, x))
        _one_line_error("NaN or infinite", encoder.features, torch.where(x > 0.5, bad, x))
    _one_line_error("precision must be one of auto, bf16, fp16, fp32", encoder.embed, x, precision="fp8")
    _one_line_error("precision must be one of", encoder.features, x, precision="fp8")
    # the shape in the message is the caller's, not the one after a batch axis was added
    _one_line_error("got float32 (8, 8, 3)", encoder.embed, np.zeros((8, 8, 3), np.float32))
    _one_line_error("got shape (3, 8, 8, 2)", encoder.embed, np.zeros((3, 8, 8, 2), np.uint8))
    _one_line_error("is a folder, not a file", crlf_api.load_encoder, encoder_run)
    for device in ("tpu", "cudax", "cuda:-1"):
        _one_line_error("unknown device", crlf_api.load_encoder, ckpt, device=device)
        _one_line_error("unknown device", encoder.embed, x, device=device)
    _one_line_error("available", encoder.to, "cuda:7")
    assert encoder.to(torch.device("cpu", 0)).device == torch.device("cpu")


def test_a_cuda_device_that_is_not_here_is_named_with_those_that_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _one_line_error("no such CUDA device here (available: cpu, cuda:0 .. cuda:1", crlf_api.select_device, "cuda:7")
    assert crlf_api.select_device("cuda:1") == torch.device("cuda", 1)


def test_embed_api_takes_empty_lists_and_grayscale_arrays_as_the_npy_source(encoder_run, tmp_path):
    ckpt = encoder_run / "encoder.safetensors"
    encoder = crlf_api.load_encoder(ckpt)
    for empty in ([], (), np.zeros((0, 8, 8, 3), np.uint8), np.zeros((0, 8, 8), np.uint8), torch.zeros(0, 3, 8, 8)):
        rows = encoder.embed(empty)
        assert rows.shape == (0, 512) and rows.dtype == torch.float32
    gray = np.random.default_rng(5).integers(0, 256, (4, 12, 10), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    r = run_crlf("extract", "--ckpt", ckpt, "--data", "npy", "--data-dir", tmp_path / "gray.npy", "--device", "cpu",
                 "--out", tmp_path / "e.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    extracted = torch.from_numpy(np.load(tmp_path / "e.npy"))
    assert torch.equal(encoder.embed(gray), extracted)
    assert torch.equal(encoder.embed(gray[..., None]), extracted)  # (N, H, W, 1)
    assert torch.equal(encoder.embed(np.repeat(gray[..., None], 3, -1)), extracted)
    assert torch.allclose(encoder.embed(gray[1]), extracted[1:2], atol=1e-4)  # one (H, W) image
    assert torch.equal(encoder.embed([gray[:2], gray[2:]]), extracted)  # a list item with several images: all


def test_extract_stdout_npz_and_batch_size_invariance(tmp_path, encoder_run, tiny_cifar_root):
    common = [
        "--ckpt",
        encoder_run / "encoder.safetensors",
        "--data",
        "cifar10",
        "--data-dir",
        tiny_cifar_root,
        "--device",
        "cpu",
    ]
    piped = crlf("extract", *common, "--out", "-", "--embed-batch-size", "7")
    assert piped.returncode == 0, piped.stderr.decode()
    streamed = np.load(io.BytesIO(piped.stdout))  # stdout holds exactly one .npy and nothing else
    r = crlf("extract", *common, "--out", tmp_path / "emb.npz", "--embed-batch-size", "64", "--normalize")
    assert r.returncode == 0, r.stderr.decode()
    with np.load(tmp_path / "emb.npz") as z:
        assert set(z.files) == {"embeddings", "labels", "ids", "class_names", "provenance"}
        stored = z["embeddings"]
        assert json.loads(str(z["provenance"]))["l2_normalized"] is True
    assert streamed.shape == stored.shape == (200, 512)
    assert np.allclose(streamed / np.linalg.norm(streamed, axis=1, keepdims=True), stored, atol=1e-5)
    x, y, names, prov = read_embeddings(tmp_path / "emb.npz")
    assert x.shape == (200, 512) and y.tolist() == [i % 10 for i in range(40)] * 5 and len(names) == 10


def test_linear_and_knn_eval_from_files_and_checkpoint(tmp_path, encoder_run, tiny_cifar_root):
    common = [
        "--ckpt",
        encoder_run / "encoder.safetensors",
        "--data",
        "cifar10",
        "--data-dir",
        tiny_cifar_root,
        "--device",
        "cpu",
    ]
    for split in ("train", "test"):
        assert crlf("extract", *common, "--split", split, "--out", tmp_path / f"{split}.npy").returncode == 0
    r = crlf(
        "linear-eval",
        "--train-emb",
        tmp_path / "train.npy",
        "--test-emb",
        tmp_path / "test.npy",
        "--device",
        "cpu",
        "--label-fraction",
        "0.5",
        "--label-fraction",
        "1",
        "--seeds",
        "2",
        "--probe-epochs",
        "20",
        "--json",
        "--results",
        tmp_path / "lin.json",
    )
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    assert [s["fraction"] for s in result["summary"]] == [0.5, 1.0] and all(s["runs"] == 2 for s in result["summary"])
    assert {run["train_size"] for run in result["runs"] if run["fraction"] == 0.5} == {100}
    assert len(result["confusion"]) == 10 and sum(map(sum, result["confusion"])) == 40
    assert json.loads((tmp_path / "lin.json").read_text())["top1"] == result["top1"]
    assert np.load(tmp_path / "lin_confusion.npy").sum() == 40
    assert "top-1" in r.stderr.decode()  # the table for a person
    _check_summary(result, seeds=[0, 1])

    k = crlf("knn-eval", *common, "-k", "5", "--json")
    assert k.returncode == 0, k.stderr.decode()
    knn = json.loads(k.stdout)
    assert knn["protocol"] == "knn" and knn["runs"][0]["k"] == 5
    # the same numbers as a kNN on the extracted embeddings, by the CLI and by evaluate.knn_classify
    train_x, train_y, _, _ = read_embeddings(tmp_path / "train.npy")
    test_x, test_y, _, _ = read_embeddings(tmp_path / "test.npy")
    ref = knn_classify(train_x, train_y, test_x, test_y, 10, k=5, temperature=0.1, device=torch.device("cpu"))
    emb = ["--train-emb", tmp_path / "train.npy", "--test-emb", tmp_path / "test.npy"]
    files = crlf("knn-eval", *emb, "-k", "5", "--device", "cpu", "--json")
    assert knn["top1"] == pytest.approx(ref.top1) == json.loads(files.stdout)["top1"]
    assert knn["top5"] == pytest.approx(ref.top5)
    assert json.loads((encoder_run / "knn_eval.json").read_text())["top1"] == knn["top1"]  # saved in the run directory


def _check_summary(result, seeds):
    """Each label fraction's mean and std are statistics.fmean / pstdev of its runs' top-1 and top-5 (4 decimals)."""
    assert [row["fraction"] for row in result["summary"]] == list(dict.fromkeys(r["fraction"] for r in result["runs"]))
    for row in result["summary"]:
        runs = [r for r in result["runs"] if r["fraction"] == row["fraction"]]
        assert [r["seed"] for r in runs] == seeds and row["runs"] == len(seeds)
        for m in ("top1", "top5"):
            assert row[f"{m}_mean"] == pytest.approx(statistics.fmean(r[m] for r in runs), abs=1e-4)
            assert row[f"{m}_std"] == pytest.approx(statistics.pstdev(r[m] for r in runs), abs=1e-4)
    assert result["top1"] == [r["top1"] for r in result["runs"] if r["fraction"] == 1.0][0]  # the full-label run


def test_eval_of_separable_embeddings_is_accurate_and_summarises_the_seeds(tmp_path):
    """Four Gaussian blobs in 16 dimensions, far apart: the probe and kNN classify the test split perfectly; with
    closer blobs the seeds' label subsets give different runs, whose mean / std the summary must report."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(4, 16))

    def blobs(name, n, spread):
        y = np.arange(n) % 4
        x = (directions[y] * spread + rng.normal(size=(n, 16))).astype(np.float32)
        names = np.array(["a", "b", "c", "d"])
        np.savez(tmp_path / name, embeddings=x, labels=y, class_names=names, provenance=json.dumps({}))
        return tmp_path / name

    far = ["--train-emb", blobs("far_train.npz", 200, 10.0), "--test-emb", blobs("far_test.npz", 80, 10.0)]
    knn = crlf("knn-eval", *far, "-k", "10", "--device", "cpu", "--json")
    assert knn.returncode == 0, knn.stderr.decode()
    assert json.loads(knn.stdout)["top1"] == 100.0
    lin = crlf("linear-eval", *far, "--device", "cpu", "--probe-epochs", "30", "--json")
    assert lin.returncode == 0, lin.stderr.decode()
    assert json.loads(lin.stdout)["top1"] == 100.0
    near = ["--train-emb", blobs("train.npz", 200, 0.9), "--test-emb", blobs("test.npz", 200, 0.9)]
    args = ["--label-fraction", "0.1", "--label-fraction", "1", "--seeds", "3", "--seed", "5", "--probe-epochs", "30"]
    r = crlf("linear-eval", *near, *args, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    _check_summary(result, seeds=[5, 6, 7])
    few = [run["top1"] for run in result["runs"] if run["fraction"] == 0.1]
    assert len(set(few)) > 1 and result["summary"][0]["top1_std"] > 0  # the seeds differ: a real std
    assert 50 < result["summary"][1]["top1_mean"] < 100  # overlapping blobs: better than chance (25%), not perfect


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("missing_ckpt", "does not exist"),
        ("truncated_ckpt", "not a readable safetensors file"),
        ("missing_out_dir", "does not exist"),
        ("bad_suffix", "--out must end in .npy or .npz"),
        ("json_and_stdout", "both want stdout"),
        ("no_ckpt", "needs --ckpt"),
    ],
)
def test_extract_bad_input(tmp_path, encoder_run, tiny_npz, case, fragment):
    ckpt, out = encoder_run / "encoder.safetensors", tmp_path / "emb.npy"
    extra = []
    if case == "missing_ckpt":
        ckpt = tmp_path / "nope.safetensors"
    elif case == "truncated_ckpt":
        ckpt = tmp_path / "cut.safetensors"
        ckpt.write_bytes((encoder_run / "encoder.safetensors").read_bytes()[:5000])
    elif case == "missing_out_dir":
        out = tmp_path / "no" / "such" / "emb.npy"
    elif case == "bad_suffix":
        out = tmp_path / "emb.txt"
    elif case == "json_and_stdout":
        out, extra = "-", ["--json"]
    args = ["extract", "--data", "npz", "--data-dir", tiny_npz, "--out", out, "--device", "cpu", *extra]
    if case != "no_ckpt":
        args += ["--ckpt", ckpt]
    r = crlf(*args)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and fragment in err.strip().splitlines()[-1], err
    assert not (tmp_path / "emb.npy").exists()


def test_extract_into_read_only_dir_leaves_nothing(tmp_path, encoder_run, tiny_npz):
    """A folder that refuses new files: a chmod 500 one, or for root (who ignores modes) /proc."""
    ro = tmp_path / "ro" if os.geteuid() else Path("/proc")
    if os.geteuid():
        ro.mkdir()
        ro.chmod(0o500)
    r = crlf(
        "extract",
        "--ckpt",
        encoder_run / "encoder.safetensors",
        "--data",
        "npz",
        "--data-dir",
        tiny_npz,
        "--out",
        ro / "e.npy",
        "--device",
        "cpu",
    )
    if os.geteuid():
        ro.chmod(0o700)
    err = r.stderr.decode()
    assert r.returncode == 2 and "cannot write" in err and "Traceback" not in err, err
    assert not [p for p in ro.iterdir() if p.name.startswith("e.npy") or p.name.startswith(".e.npy")]


def test_eval_needs_labels(tmp_path, encoder_run, tiny_npz):
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x)
    r = crlf("knn-eval", "--train-emb", tmp_path / "a.npy", "--test-emb", tmp_path / "b.npy", "--device", "cpu")
    assert r.returncode == 2 and "has no labels" in r.stderr.decode()
    np.save(tmp_path / "c.npy", x.astype(np.int32))
    r = crlf("knn-eval", "--train-emb", tmp_path / "c.npy", "--test-emb", tmp_path / "b.npy", "--device", "cpu")
    assert r.returncode == 2 and "expected a float N x D array" in r.stderr.decode()


def test_linear_eval_finetune_from_the_cli(tmp_path, encoder_run, tiny_cifar_root):
    ckpt = encoder_run / "encoder.safetensors"
    before = ckpt.read_bytes()
    r = crlf(
        "linear-eval",
        "--ckpt",
        ckpt,
        "--data",
        "cifar10",
        "--data-dir",
        tiny_cifar_root,
        "--limit",
        "64",
        "--device",
        "cpu",
        "--finetune",
        "--probe-epochs",
        "1",
        "--json",
        "--results",
        tmp_path / "ft.json",
    )
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    assert result["protocol"] == "finetune" and result["train_size"] == 64 and sum(map(sum, result["confusion"])) == 40
    assert json.loads((tmp_path / "ft.json").read_text())["top1"] == result["top1"]
    assert ckpt.read_bytes() == before  # the checkpoint itself is never changed
