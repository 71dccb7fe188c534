"""visualize: every figure from tiny data is a valid image of the promised size; --run writes what it promises;
projections have the right shape; a missing input is exit 2 with a line naming the file that is needed."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import copy_run
from inprocess import run_crlf
from PIL import Image

from crlf import PretrainSettings, pretrain
from crlf.commands.evaluate import linear_eval
from crlf.commands.visualize import visualize
from crlf.engine import plots
from crlf.engine.projection import project
from crlf.errors import InputError
from crlf.settings import LinearEvalSettings, VisualizeSettings

SIZES = {"loss": (1100, 750), "pca": (900, 750), "tsne": (900, 750), "confusion": (920, 800)}  # confusion: 10 classes


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run on the digits (kNN monitor on, crop_min_scale 0.5) with a linear-eval result in it."""
    out = tmp_path_factory.mktemp("vis") / "run"
    pretrain(
        PretrainSettings(
            data="digits",
            limit=128,
            image_size=8,
            batch_size=32,
            epochs=2,
            head_hidden=32,
            head_out=16,
            device="cpu",
            knn_every=1,
            k=10,
            crop_min_scale=0.5,
            out=out,
        )
    )
    linear_eval(
        LinearEvalSettings(
            ckpt=out / "encoder.safetensors", data="digits", limit=128, image_size=8, device="cpu", probe_epochs=5
        )
    )
    return out


def png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format, im.size


def test_run_draws_every_figure_and_an_index(run_dir):
    result = visualize(VisualizeSettings(run=[run_dir], max_points=100, device="cpu"))
    figures = run_dir / "figures"
    assert (
        set(result["figures"]) == {"loss", "confusion", "pca", "tsne", "neighbors", "augmentations"}
        and result["skipped"] == {}
    )
    for kind, info in result["figures"].items():
        fmt, size = png_size(figures / f"{kind}.png")
        assert fmt == "PNG" and info["path"] == str(figures / f"{kind}.png")
        if kind in SIZES:
            assert size == SIZES[kind], kind
    assert result["figures"]["tsne"]["coords_shape"] == [100, 2]
    assert png_size(figures / "neighbors.png")[1] == (round(1.25 * 9 * 100 + 50), round(1.45 * 6 * 100 + 80))
    page = (figures / "index.html").read_text()
    for kind in result["figures"]:
        assert f'src="{kind}.png"' in page
    assert "crop_min_scale" in page and "linear eval top-1" in page and "knn_top1" in page
    # the augmentation settings come from the run's config unless given
    assert result["figures"]["augmentations"]["settings"]["crop_min_scale"] == 0.5
    again = visualize(
        VisualizeSettings(run=[run_dir], kind=["augmentations"], crop_min_scale=0.3, out=run_dir / "aug.svg")
    )
    assert again["figures"]["augmentations"]["settings"]["crop_min_scale"] == 0.3
    assert (run_dir / "aug.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def cli(*args):
    return run_crlf(*args)


def test_cli_embeddings_map_and_loss_overlay(tmp_path, run_dir):
    ckpt = run_dir / "encoder.safetensors"
    data = ["--data", "digits", "--split", "test", "--device", "cpu"]
    r = cli("extract", "--ckpt", ckpt, *data, "--out", tmp_path / "e.npz")
    assert r.returncode == 0, r.stderr
    r = cli("visualize", "--emb", tmp_path / "e.npz", "--kind", "pca", "--out", tmp_path / "pca.png", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["figures"]["pca"]["points"] == 359
    assert png_size(tmp_path / "pca.png") == ("PNG", SIZES["pca"])
    copy_run(run_dir, tmp_path / "other")
    result = visualize(VisualizeSettings(run=[run_dir, tmp_path / "other"], kind=["loss"], out=tmp_path / "figs"))
    assert result["figures"]["loss"]["runs"] == [str(run_dir), str(tmp_path / "other")]
    assert png_size(tmp_path / "figs" / "loss.png") == ("PNG", SIZES["loss"]) and "index" in result


def test_augmentations_from_a_folder(tmp_path, tiny_folder):
    result = visualize(
        VisualizeSettings(
            data="folder",
            data_dir=tiny_folder,
            image_size=16,
            kind=["augmentations"],
            views=3,
            queries=4,
            out=tmp_path / "aug.png",
        )
    )
    fmt, (w, h) = png_size(tmp_path / "aug.png")
    assert fmt == "PNG" and (w, h) == (round(1.2 * 7 * 100 + 50), round(1.35 * 4 * 100 + 100))
    assert result["figures"]["augmentations"]["images"] == 4 and "index" not in result


def test_projections_have_the_right_shape_and_pca_is_pca():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16)) * np.linspace(5, 0.1, 16)  # the first axes carry the variance
    coords, seconds = project(x, "pca")
    assert coords.shape == (60, 2) and seconds >= 0
    singular = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert np.allclose(coords.var(0) * 60, singular[:2] ** 2, rtol=1e-4)
    assert project(x, "tsne", seed=1)[0].shape == (60, 2)
    assert np.array_equal(project(x, "tsne", seed=1)[0], project(x, "tsne", seed=1)[0])  # seeded layout
    with pytest.raises(InputError, match="at least 3"):
        project(x[:2], "pca")


def test_unlabelled_map_and_many_classes_still_draw(tmp_path):
    coords = np.random.default_rng(0).normal(size=(50, 2))
    plots.save(plots.embedding_map(coords, None, [], "t", "PCA", "n"), tmp_path / "a.png")
    plots.save(plots.embedding_map(coords, np.arange(50) % 40, [], "t", "PCA", "n"), tmp_path / "b.pdf")
    plots.save(plots.confusion(np.eye(40, dtype=int) * 3, [f"c{i}" for i in range(40)], "t"), tmp_path / "c.png")
    assert png_size(tmp_path / "a.png")[0] == "PNG" and (tmp_path / "b.pdf").read_bytes().startswith(b"%PDF")
    assert png_size(tmp_path / "c.png")[1] == (1520, 1400)


@pytest.mark.parametrize(
    "settings,fragment",
    [
        (dict(kind=["loss"]), "loss needs a run directory"),
        (dict(kind=["confusion"]), "confusion needs a linear-eval result"),
        (dict(kind=["tsne"]), "tsne needs --emb FILE, --ckpt FILE or --run DIR"),
        (dict(), "nothing to draw"),
        (dict(emb="e.npy", kind=["neighbors"]), "neighbors needs the images"),
        (dict(emb="missing.npy", kind=["pca"]), "pca needs missing.npy: write it with crlf extract"),
        (dict(run=["nope"]), "run directory 'nope' does not exist"),
        (dict(run=["empty"], kind=["confusion"]), "confusion needs empty/linear_eval.json"),
        (dict(run=["empty"], kind=["pca"]), "pca needs empty/encoder.safetensors"),
    ],
)
def test_missing_inputs_name_what_is_needed(tmp_path, monkeypatch, settings, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=fragment):
        visualize(VisualizeSettings(**settings))
    assert not (tmp_path / "figures").exists() or not list((tmp_path / "figures").iterdir())


def test_missing_run_files_exit_2_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    for kind, needed in (
        ("loss", "metrics.jsonl"),
    ):  # the other files' messages: test_missing_inputs_name_what_is_needed
        r = cli("visualize", "--run", tmp_path / "empty", "--kind", kind)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
        assert lines[-1].startswith("error: ") and needed in lines[-1] and str(tmp_path / "empty") in lines[-1]
    monkeypatch.chdir(tmp_path)
    r = cli("visualize", "--kind", "pca", "--kind", "tsne", "--out", "x.png")
    assert r.returncode == 2 and "names one file" in r.stderr


def test_figures_read_well_neighbour_distances_pca_variance_no_timings_short_titles(run_dir, tmp_path, monkeypatch):
    import re

    figs = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.__setitem__(path.stem, fig))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("crlf.commands.visualize")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        result = visualize(
            VisualizeSettings(run=[run_dir], kind=["pca", "neighbors"], max_points=100, device="cpu", out=tmp_path)
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    pca = figs["pca"].axes[0]
    for label, axis in ((pca.get_xlabel(), 1), (pca.get_ylabel(), 2)):
        assert re.fullmatch(rf"PC {axis} \(\d+\.\d% of the variance\)", label), label
    share = result["figures"]["pca"]["explained_variance"]
    assert 0 < share[1] <= share[0] < 1
    titles = [pca.get_title(), figs["pca"]._suptitle.get_text(), figs["neighbors"]._suptitle.get_text()]
    assert not any(re.search(r"\d s\b", t) for t in titles), titles  # run-time noise goes to the log
    assert not any(str(tmp_path) in t or "/" in t.replace("d = 1 - cosine", "") for t in titles), titles
    captions = [ax.get_xlabel() for ax in figs["neighbors"].axes if "d=" in ax.get_xlabel()]
    assert len(captions) == 6 * 8 and all(re.search(r"#\d+ d=\d", c) for c in captions)
    distances = [float(c.split("d=")[1]) for c in captions]
    assert len(set(distances)) > len(distances) // 2  # the distances separate what 0.99x cosines do not
    index = result["index"]
    assert any(index in r.getMessage() and "browser" in r.getMessage() for r in records)
    page = (tmp_path / "index.html").read_text()
    assert "training time" in page and "device" in page and "figures drawn with" in page and "crlf 0." in page


def test_run_facts_use_the_resolved_block_and_fall_back_without_it():
    from crlf.engine.plots import short_source
    from crlf.engine.runpage import run_facts

    metrics = [{"epoch": 1, "seconds": 50.0}, {"epoch": 2, "seconds": 70.4}]
    resolved = {"device": "cuda:0", "device_name": "NVIDIA H100", "precision": "bf16", "crlf": "0.2.0",
                "torch": "2.5.1", "git_commit": "abc123", "command": "crlf pretrain --epochs 2"}  # fmt: skip
    facts = run_facts({"epochs": 2, "device": "auto", "resolved": resolved}, metrics)
    assert facts["training time"] == "2 min 00 s" and facts["epochs"] == "2 of 2"
    assert facts["device"] == "cuda:0 (NVIDIA H100)" and facts["precision"] == "bf16"
    assert "crlf 0.2.0, torch 2.5.1" in facts["trained with"] and facts["git commit"] == "abc123"
    old = run_facts({"epochs": 5, "device": "auto", "precision": "auto"}, metrics[:1])
    assert old["device"].startswith("auto") and old["training time"] == "50.0 s" and "trained with" not in old
    assert "figures drawn with" in old and run_facts({}, [])["figures drawn with"].startswith("crlf ")
    assert short_source("npy:/home/me/data/images.npy") == "npy:images.npy"
    assert short_source("digits:test") == "digits:test"


def test_a_linked_figures_folder_of_a_run_is_refused_and_never_written_into(tmp_path, run_dir):
    run = tmp_path / "run"
    copy_run(run_dir, run, ignore=shutil.ignore_patterns("figures"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "index.html").write_text("mine")
    (run / "figures").symlink_to(foreign)
    with pytest.raises(InputError, match="symbolic link"):
        visualize(VisualizeSettings(run=[run], kind=["loss"]))
    assert [p.name for p in foreign.iterdir()] == ["index.html"] and (foreign / "index.html").read_text() == "mine"


def test_the_index_rounds_the_settings_it_shows(tmp_path, run_dir):
    run = tmp_path / "run"
    copy_run(run_dir, run, ignore=shutil.ignore_patterns("figures"))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "lr": 0.076 / 7}))  # 0.010857142857142857
    visualize(VisualizeSettings(run=[run], kind=["loss"]))
    page = (run / "figures" / "index.html").read_text()
    assert "<td>0.0108571</td>" in page and "0.01085714285" not in page
