"""The run directory and the files crlf writes: only its own folders, never through links, nothing lost or
mismatched when a write fails, divergence caught before a checkpoint is called good, what ran recorded."""

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_run

import crlf
from crlf import PretrainSettings, pretrain
from crlf.commands import evaluate, extract
from crlf.engine import checkpoint, files, rundir
from crlf.engine.embedfile import read_embeddings
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, RunError
from crlf.settings import ExtractSettings, KnnEvalSettings


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def tiny(out: Path, **overrides) -> PretrainSettings:
    """32 digits at 8 px, batch 16, one epoch: the smallest real run."""
    values = dict(data="digits", limit=32, image_size=8, batch_size=16, epochs=1, head_hidden=32, head_out=16,
                  device="cpu", out=out)
    return PretrainSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run, shared (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    pretrain(tiny(out))
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_links_in_a_run_directory_are_refused_and_never_written_through(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for name in (".lock", "metrics.jsonl", "train.log", "checkpoints"):
        out = tmp_path / f"run-{name.strip('.')}"
        out.mkdir()
        (out / name).symlink_to(victim)
        with pytest.raises(InputError, match="symbolic link"):
            pretrain(tiny(out))
        assert victim.read_text() == "keep me"
    with pytest.raises(InputError, match="symbolic link"):  # the primitive itself refuses, whoever calls it
        files.open_no_follow(tmp_path / "run-lock" / ".lock")


def test_force_checks_data_first_and_foreign_folders_are_never_cleared(tmp_path, trained):
    run = tmp_path / "run"
    copy_run(trained, run)
    before = files_of(run)
    with pytest.raises(InputError, match="does not exist"):
        pretrain(tiny(run, data="npy", data_dir=tmp_path / "missing.npy"), force=True)
    after = files_of(run)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}

    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "config.json").write_text('{"mine": true}')
    (foreign / "checkpoints" / "model.pt").write_text("weights")
    for kwargs in ({"force": True}, {"resume": True}, {}):
        with pytest.raises(InputError, match="not made by crlf"):
            pretrain(tiny(foreign), **kwargs)
    assert files_of(foreign) == {"config.json": b'{"mine": true}', "checkpoints/model.pt": b"weights"}


def test_force_on_a_real_run_starts_over_and_keeps_a_working_log(tmp_path, trained):
    run = tmp_path / "run"
    copy_run(trained, run)
    (run / "linear_eval.json").write_text("{}")  # results of the encoder being discarded
    old_encoder = (run / "encoder.safetensors").read_bytes()
    summary = pretrain(tiny(run, seed=1), force=True)
    assert summary["status"] == "trained"
    log = (run / "train.log").read_text()
    assert "discarding the run" in log and log.rstrip().splitlines()[-1].endswith(str(run / "encoder.safetensors"))
    assert log.count("epoch 1/1") == 2  # the old run's history, then the new run's
    assert not (run / "linear_eval.json").exists() and (run / "encoder.safetensors").read_bytes() != old_encoder
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    out = tmp_path / "runs" / "new"
    with pytest.raises(InputError):
        pretrain(tiny(out, batch_size=64))  # larger than the 32 images
    assert not (tmp_path / "runs").exists()  # nor the parent folder it made
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="does not exist"):
        pretrain(tiny(empty, data="npy", data_dir=tmp_path / "missing.npy"))
    assert list(empty.iterdir()) == []  # the user's folder stays, without .crlf-run, .lock or train.log
    assert pretrain(tiny(out))["status"] == "trained"


def test_hard_links_and_odd_files_in_a_run_directory_are_never_written_into(tmp_path, trained):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for name in (".lock", "metrics.jsonl", "train.log"):
        run = tmp_path / f"run-{name.strip('.')}"
        copy_run(trained, run)
        (run / name).unlink(missing_ok=True)
        os.link(victim, run / name)
        with pytest.raises(InputError, match="hard links"):
            pretrain(tiny(run, epochs=2), resume=True)
        assert victim.read_text() == "keep me"
        with pytest.raises(InputError, match="hard links"):  # the primitive itself refuses, whoever calls it
            files.append_line(run / name, "x\n")
        assert victim.read_text() == "keep me"
    fifo = tmp_path / "run-fifo"
    copy_run(trained, fifo)
    os.unlink(fifo / "train.log")
    os.mkfifo(fifo / "train.log")
    with pytest.raises(InputError, match="not a regular file"):  # refused at once, not blocked on the FIFO
        pretrain(tiny(fifo, epochs=2), resume=True)


def test_only_crlfs_own_temporary_files_are_removed(tmp_path, trained):
    run = tmp_path / "run"
    copy_run(trained, run)
    mine = [run / ".notes.tmp", run / ".x.tmp", run / ".photo.jpg.abcd1234.tmp", run / "checkpoints" / ".mine.tmp"]
    crlfs = [run / ".config.json.k2j_9xq0.tmp", run / ".last.safetensors.abcdefgh.tmp",
             run / "checkpoints" / ".epoch-0003.safetensors.tmp"]
    for path in mine + crlfs:
        path.write_text("data")
    RunDir(run).remove_temp_files()
    assert all(p.exists() for p in mine) and not any(p.exists() for p in crlfs)


def test_out_inside_another_run_or_the_root_or_home_is_refused(tmp_path, trained, monkeypatch):
    run = tmp_path / "A"
    copy_run(trained, run)
    for inner in (run / "checkpoints", run / "sub" / "B"):
        with pytest.raises(InputError, match="inside the crlf run"):
            pretrain(tiny(inner))
    assert not (run / "sub").exists()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for where, word in ((Path("/"), "root"), (home, "home"), (Path("~"), "home")):
        with pytest.raises(InputError, match=f"the {word} folder itself"):
            pretrain(tiny(where))
    assert list(home.iterdir()) == []


def test_divergence_with_a_finite_loss_fails_and_keeps_no_bad_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunError, match="diverged .* NaN or infinite") as e:
        pretrain(tiny(out, lr=1e6, epochs=2))
    assert "no checkpoint was written" in str(e.value) or "last good checkpoint" in str(e.value)
    assert not (out / "encoder.safetensors").exists()
    for path in RunDir(out).checkpoints_newest_first():  # whatever was kept embeds to finite numbers
        encoder = crlf.load_encoder(path)
        assert torch.isfinite(encoder.backbone(torch.rand(4, 3, 8, 8))).all()


def test_extract_refuses_an_encoder_that_gives_nan(tmp_path, trained):
    tensors, meta = checkpoint.read_tensors(trained / "encoder.safetensors")
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["bn1.running_var"].fill_(float("nan"))
    bad = tmp_path / "bad.safetensors"
    checkpoint.save_tensors(bad, tensors, {k: v for k, v in meta.items() if k not in ("sha256",)})
    with pytest.raises(InputError, match="NaN or infinite embeddings"):
        extract.extract(ExtractSettings(ckpt=bad, data="digits", image_size=8, limit=16, device="cpu",
                                           out=str(tmp_path / "e.npy")))
    assert not (tmp_path / "e.npy").exists()


def test_an_npy_and_a_sidecar_of_two_extracts_are_refused_as_a_pair(tmp_path, trained):
    out = tmp_path / "e.npy"
    common = dict(ckpt=trained / "encoder.safetensors", data="digits", image_size=8, device="cpu", out=str(out))
    extract.extract(ExtractSettings(limit=16, **common))
    x, y, _, prov = read_embeddings(out)
    assert len(x) == 16 and prov["npy_bytes"] == out.stat().st_size
    old_sidecar = Path(str(out) + ".json").read_bytes()
    extract.extract(ExtractSettings(limit=24, **common))
    Path(str(out) + ".json").write_bytes(old_sidecar)  # as if killed between the .npy's rename and the sidecar's
    with pytest.raises(InputError, match="does not describe"):
        read_embeddings(out)


def test_provenance_hashes_the_bytes_that_were_loaded(tmp_path, trained, monkeypatch):
    ckpt = tmp_path / "encoder.safetensors"
    shutil.copy(trained / "encoder.safetensors", ckpt)
    loaded = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    real = extract.embed_images

    def replaced_meanwhile(*args, **kwargs):
        ckpt.write_bytes(b"another file now")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "embed_images", replaced_meanwhile)
    emb = crlf.embed(ckpt, data="digits", image_size=8, limit=8, device="cpu")
    assert emb.provenance["checkpoint_sha256"] == loaded


@pytest.mark.parametrize("umask, existing, expected", [(0o022, None, 0o644), (0o077, None, 0o600),
                                                       (0o022, 0o640, 0o640)])
def test_atomic_writes_respect_the_umask_and_an_existing_mode(tmp_path, umask, existing, expected):
    path = tmp_path / "f.bin"
    if existing is not None:
        path.write_bytes(b"old")
        path.chmod(existing)
    old = os.umask(umask)
    try:
        files.atomic_write(path, lambda f: f.write(b"new"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == expected


def test_a_full_disk_is_one_line_and_exit_1_wherever_it_strikes(tmp_path, trained, monkeypatch, capfd):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # a fresh run whose folder cannot even be created
        m.setattr(Path, "mkdir", full)
        with pytest.raises(RunError, match="No space left"):
            pretrain(tiny(tmp_path / "new"))
    run = tmp_path / "run"
    copy_run(trained, run)
    handler = rundir._LogFile(run / "train.log")
    handler.file = type("Full", (), {"write": full, "flush": full, "close": full})()
    import logging

    record = logging.LogRecord("crlf", logging.INFO, __file__, 1, "a line", None, None)
    handler.emit(record)
    handler.emit(record)
    handler.close()
    err = capfd.readouterr().err
    assert "Logging error" not in err and err.count("cannot write") == 1 and "Traceback" not in err


def test_snapshots_sort_by_number_past_epoch_9999(tmp_path, trained):
    run = RunDir(tmp_path / "run")
    copy_run(trained, run.path)
    for epoch in (9998, 9999, 10000):
        run.snapshot(epoch, keep=2)
    names = [p.name for p in run.snapshots()]
    assert names == ["epoch-9999.safetensors", "epoch-10000.safetensors"]
    assert run.checkpoints_newest_first()[1].name == "epoch-10000.safetensors"


def test_resume_of_a_complete_run_in_a_read_only_folder_is_a_no_op(tmp_path, trained, monkeypatch):
    run = tmp_path / "run"
    copy_run(trained, run)
    before = files_of(run)
    monkeypatch.setattr(RunDir, "writable", lambda self: False)
    monkeypatch.setattr(RunDir, "locked", lambda self: pytest.fail("a read-only folder cannot be locked"))
    assert pretrain(tiny(run), resume=True)["status"] == "complete"
    assert files_of(run) == before
    with pytest.raises(InputError, match="read-only"):
        pretrain(tiny(run, epochs=2), resume=True)


def test_config_json_records_what_ran(trained):
    config = json.loads((trained / "config.json").read_text())
    resolved = config["resolved"]
    assert config["lr"] == resolved["lr"] == 0.06 * 16 / 64 and config["weight_decay"] == resolved["weight_decay"]
    assert resolved["device"] == "cpu" and resolved["precision"] == "fp32" and resolved["world_size"] == 1
    assert resolved["torch"] == torch.__version__ and resolved["crlf"] == crlf.__version__
    meta = json.loads(checkpoint.read_tensors(trained / "encoder.safetensors")[1]["config"])
    assert meta["lr"] == config["lr"]


def test_outputs_are_checked_before_any_work(tmp_path, trained, monkeypatch):
    monkeypatch.setattr(extract, "embed_images", lambda *a, **k: pytest.fail("embedded before checking --out"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.npy").mkdir()
    for out, match in (("no/e.npy", "does not exist"), ("a-file/e.npy", "does not exist"), ("folder.npy", "folder")):
        with pytest.raises(InputError, match=match):
            extract.extract(ExtractSettings(ckpt=trained / "encoder.safetensors", data="digits", image_size=8,
                                               device="cpu", out=str(tmp_path / out)))
    with pytest.raises(InputError, match="--results"):
        evaluate.knn_eval(KnnEvalSettings(ckpt=trained / "encoder.safetensors", data="digits", image_size=8,
                                            device="cpu", results=tmp_path / "nowhere" / "r.json"))


def test_npy_data_takes_its_test_split_from_test_data_dir(tmp_path, trained):
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 20)):
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
        np.save(tmp_path / f"{name}.labels.npy", np.arange(n) % 2)
    common = dict(ckpt=trained / "encoder.safetensors", data="npy", data_dir=tmp_path / "train.npy", device="cpu",
                  results=tmp_path / "r.json")
    with pytest.raises(InputError, match="--test-data-dir"):
        evaluate.knn_eval(KnnEvalSettings(**common))
    result = evaluate.knn_eval(KnnEvalSettings(test_data_dir=tmp_path / "test.npy", **common))
    assert result["train_size"] == 40 and result["test_size"] == 20


def test_a_metrics_line_cut_off_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 1, "loss": 5.0})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        run.append_metrics({"epoch": 2, "loss": 4.0})
    monkeypatch.undo()
    assert run.read_metrics() == [{"epoch": 1, "loss": 5.0}]
    with open(run.metrics, "a") as f:  # a line torn by a crash that no truncation could take back
        f.write('{"epoch": 2, "lo')
    assert run.read_metrics() == [{"epoch": 1, "loss": 5.0}]
