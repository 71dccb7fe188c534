"""Settings: validation, precedence CLI > env > TOML > defaults, TOML round trip."""

from pathlib import Path

import pytest

from crlf.errors import InputError
from crlf.settings import PretrainSettings, resolve, to_toml


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_defaults():
    s = resolve(PretrainSettings, {})
    assert (s.data, s.epochs, s.batch_size, s.device, s.optimizer, s.arch) == (
        "digits",
        100,
        512,
        "auto",
        "sgd",
        "resnet18",
    )
    assert s.resolved_lr == pytest.approx(0.48) and s.resolved_weight_decay == 5e-4


def test_precedence_cli_env_file_default(tmp_path, monkeypatch):
    cfg = write(tmp_path, "epochs = 7\nbatch_size = 64\ntemperature = 0.3\nseed = 5\n")
    monkeypatch.setenv("CRLF_EPOCHS", "3")
    monkeypatch.setenv("CRLF_BATCH_SIZE", "32")
    s = resolve(PretrainSettings, {"batch_size": 16, "epochs": None}, cfg)
    assert s.batch_size == 16  # CLI beats env
    assert s.epochs == 3  # env beats file (None = flag not given)
    assert s.temperature == 0.3  # file beats default
    assert s.seed == 5 and s.lr is None


def test_subcommand_table_overrides_top_level(tmp_path):
    cfg = write(tmp_path, "epochs = 7\n[pretrain]\nepochs = 9\n")
    assert resolve(PretrainSettings, {}, cfg).epochs == 9


def test_env_bool_and_path(monkeypatch):
    monkeypatch.setenv("CRLF_DOWNLOAD", "false")
    monkeypatch.setenv("CRLF_OUT", "runs/env")
    s = resolve(PretrainSettings, {})
    assert s.download is False and s.out == Path("runs/env")


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"epochs": 0}, "epochs"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"device": "cuda:x"}, "unknown device"),
        ({"image_size": 0}, "image-size"),
        ({"image_size": -32}, "image-size"),
        ({"batch_size": 1}, "batch-size"),
        ({"data": "imagenet"}, "data"),
        ({"data": "folder"}, "needs --data-dir"),
        ({"crop_min_scale": 0.9, "crop_max_scale": 0.5}, "crop_min_scale"),
        ({"arch": "vit"}, "arch"),
    ],
)
def test_invalid_values_name_the_setting(values, fragment):
    with pytest.raises(InputError) as info:
        resolve(PretrainSettings, values)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_all_problems_reported_together():
    with pytest.raises(InputError) as info:
        resolve(PretrainSettings, {"epochs": 0, "temperature": 0.0, "device": "tpu"})
    assert all(k in str(info.value) for k in ("epochs", "temperature", "device"))


def test_unknown_config_key_and_bad_toml(tmp_path):
    with pytest.raises(InputError, match="unknown setting 'epocs'"):
        resolve(PretrainSettings, {}, write(tmp_path, "epocs = 3\n"))
    with pytest.raises(InputError, match="not valid TOML"):
        resolve(PretrainSettings, {}, write(tmp_path, "epochs = = 3\n"))
    with pytest.raises(InputError, match="does not exist"):
        resolve(PretrainSettings, {}, tmp_path / "missing.toml")


def test_toml_round_trip(tmp_path):
    s = resolve(PretrainSettings, {"epochs": 3, "lr": 1e-6, "data_dir": "some dir/x", "download": False})
    again = resolve(PretrainSettings, {}, write(tmp_path, to_toml(s)))
    assert again == s


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.06 * 256 / 64, 5e-4), ("lars", 0.3, 1e-6), ("adam", 3e-4, 1e-4)])
def test_optimizer_defaults_scale_with_batch(optimizer, lr, wd):
    s = resolve(PretrainSettings, {"optimizer": optimizer, "batch_size": 256})
    assert s.resolved_lr == pytest.approx(lr) and s.resolved_weight_decay == wd
    assert resolve(PretrainSettings, {"optimizer": optimizer, "lr": 0.1}).resolved_lr == 0.1


def test_readme_documents_every_option_of_every_subcommand():
    from crlf.settings import _COMMANDS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert {c.section for c in _COMMANDS} == {"pretrain", "extract", "linear-eval", "knn-eval", "visualize"}
    for command in _COMMANDS:
        for name in command.model_fields:
            assert f"`--{name.replace('_', '-')}" in readme, (
                f"README lacks {command.section} --{name.replace('_', '-')}"
            )
    for flag in ("--config", "--resume", "--force", "--print-config", "--json", "--quiet", "--verbose"):
        assert flag in readme
