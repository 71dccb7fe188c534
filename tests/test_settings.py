"""Settings: validation, precedence CLI > env > TOML > defaults, TOML round trip."""

from pathlib import Path

import pytest

from crlf.errors import InputError
from crlf.options import DataSettings
from crlf.settings import (
    ExtractSettings,
    LinearEvalSettings,
    PretrainSettings,
    VisualizeSettings,
    merge,
    resolve,
    to_toml,
)


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
    from crlf.commands.pretrain import resolve as method_defaults

    assert resolve(PretrainSettings, {}).optimizer is None  # the method's choice
    s = method_defaults(resolve(PretrainSettings, {}))
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
    # the file pins the weight decay the defaults resolved to: the same run, with nothing left to resolve
    assert again == s.model_copy(update={"weight_decay": s.resolved_weight_decay})
    assert to_toml(again) == to_toml(s)


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.06 * 256 / 64, 5e-4), ("lars", 0.3, 1e-6), ("adam", 3e-4, 1e-4)])
def test_optimizer_defaults_scale_with_batch(optimizer, lr, wd):
    s = resolve(PretrainSettings, {"optimizer": optimizer, "batch_size": 256})
    assert s.resolved_lr == pytest.approx(lr) and s.resolved_weight_decay == wd
    assert resolve(PretrainSettings, {"optimizer": optimizer, "lr": 0.1}).resolved_lr == 0.1


def test_readme_documents_every_option_of_every_subcommand():
    from crlf.configfile import COMMANDS as _COMMANDS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert {c.section for c in _COMMANDS} == {"pretrain", "extract", "linear-eval", "knn-eval", "visualize", "explore",
                                          "export"}
    for command in _COMMANDS:
        for name in command.model_fields:
            assert f"`--{name.replace('_', '-')}" in readme, (
                f"README lacks {command.section} --{name.replace('_', '-')}"
            )
    for flag in ("--config", "--resume", "--force", "--print-config", "--json", "--quiet", "--verbose"):
        assert flag in readme


# --- hardening: non-finite and absurd values, config tables, CRLF_* variables ---------------------------------
def _cli(args, env=None):
    """The CLI in-process; the `crlf` logger is restored after (the CLI stops it propagating, which hides later
    tests' records from caplog)."""
    import logging

    from typer.testing import CliRunner

    from crlf.cli import app

    logger = logging.getLogger("crlf")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        return CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved


@pytest.mark.parametrize(
    "cls,values,fragment",
    [
        (PretrainSettings, {"temperature": float("inf")}, "temperature: Input should be a finite number"),
        (PretrainSettings, {"temperature": float("nan")}, "temperature"),
        (PretrainSettings, {"lr": float("inf")}, "lr"),
        (PretrainSettings, {"lr": 1e39}, "lr: Input should be less than or equal to 1e+30"),  # float32 overflow
        (PretrainSettings, {"weight_decay": float("inf")}, "weight-decay"),
        (PretrainSettings, {"grad_clip": float("inf")}, "grad-clip"),
        (PretrainSettings, {"log_every": float("inf")}, "log-every"),
        (PretrainSettings, {"knn_temperature": float("-inf")}, "knn-temperature"),
        (PretrainSettings, {"warmup_epochs": 1e308}, "warmup-epochs"),  # round(1e308 * steps) overflowed
        (PretrainSettings, {"noise_std": 1e300}, "noise-std"),  # overflowed float32 in the augmentation
        (PretrainSettings, {"jitter_strength": 1e300}, "jitter-strength"),
        (PretrainSettings, {"rotation": float("inf")}, "rotation"),
        (PretrainSettings, {"seed": 2**32}, "seed"),  # NumPy / scikit-learn refuse it
        (PretrainSettings, {"seed": 10**17}, "seed"),  # seed * 1_000_003 overflowed torch.manual_seed
        (PretrainSettings, {"head_out": 10**19}, "head-out"),
        (PretrainSettings, {"head_hidden": 10**6}, "head-hidden"),
        (PretrainSettings, {"image_size": 4}, "image-size"),  # below the encoder's minimum of 8
        (PretrainSettings, {"image_size": 100_000}, "image-size"),
        (PretrainSettings, {"epochs": 10**19}, "epochs"),
        (PretrainSettings, {"batch_size": 10**19}, "batch-size"),
        (PretrainSettings, {"k": 10**19}, "k"),
        (LinearEvalSettings, {"ckpt": "e.safetensors", "probe_lr": float("inf")}, "probe-lr"),
        (LinearEvalSettings, {"ckpt": "e.safetensors", "label_fraction": [float("nan")]}, "label-fraction"),
        (LinearEvalSettings, {"ckpt": "e.safetensors", "seed": 2**63}, "seed"),
        (LinearEvalSettings, {"ckpt": "e.safetensors", "seeds": 10**9}, "seeds"),
        (VisualizeSettings, {"seed": 2**32}, "seed"),
        (ExtractSettings, {"ckpt": "e.safetensors", "out": "e.npy", "embed_batch_size": 10**19}, "embed-batch-size"),
    ],
)
def test_non_finite_and_absurd_values_are_rejected(cls, values, fragment):
    with pytest.raises(InputError) as info:
        resolve(cls, values)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_largest_accepted_values_still_resolve():
    s = resolve(PretrainSettings, {"seed": 2**32 - 1, "image_size": 8, "head_hidden": 16384, "lr": 1e12})
    assert s.seed == 2**32 - 1 and s.image_size == 8 and s.lr == 1e12


@pytest.mark.parametrize("where", ["flag", "env", "toml"])
def test_inf_exits_2_from_every_source(tmp_path, where):
    args, env = ["pretrain", "--print-config"], None
    if where == "flag":
        args += ["--temperature", "inf"]
    elif where == "env":
        env = {"CRLF_TEMPERATURE": "inf"}
    else:
        args += ["--config", write(tmp_path, "temperature = inf\n")]
    r = _cli(args, env)
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.count("\n") == 1 and "temperature" in r.stderr and "finite" in r.stderr


PRINT_CONFIG_ARGS = {
    "pretrain": ["--data-dir", 'a dir/with "quotes" and \u00fc', "--lr", "1e-6", "--seed", str(2**32 - 1)],
    "extract": ["--ckpt", "e.safetensors", "--out", "e.npz", "--normalize"],
    "linear-eval": ["--ckpt", "e.safetensors", "--label-fraction", "0.01", "--label-fraction", "1"],
    "knn-eval": ["--train-emb", "a.npy", "--test-emb", "b.npy", "-k", "20"],
    "visualize": ["--run", "r1", "--run", "r 2", "--kind", "loss", "--kind", "pca"],
}


@pytest.mark.parametrize("command", sorted(PRINT_CONFIG_ARGS))
def test_print_config_reads_back_through_config(tmp_path, command):
    first = _cli([command, "--print-config", *PRINT_CONFIG_ARGS[command]])
    assert first.exit_code == 0, first.output
    path = tmp_path / f"{command}.toml"
    path.write_text(first.stdout)
    again = _cli([command, "--config", path, "--print-config"])
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    # the file also works as the subcommand's own table
    path.write_text(f"[{command}]\n" + first.stdout)
    assert _cli([command, "--config", path, "--print-config"]).stdout == first.stdout


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[pretrian]\nepochs = 3\n", "unknown table [pretrian] (did you mean [pretrain]?)"),
        ("[linear_eval]\nseeds = 3\n", "unknown table [linear_eval] (did you mean [linear-eval]?)"),
        ("[training]\nepochs = 3\n", "the tables are [pretrain], [extract], [export], [linear-eval], [knn-eval]"),
        ("[extract]\nnormalise = true\n", "[extract] has unknown setting 'normalise' (did you mean 'normalize'?)"),
        ("epocs = 3\n", "unknown setting 'epocs' (did you mean 'epochs'?)"),
    ],
)
def test_unknown_tables_are_errors_with_a_hint(tmp_path, text, fragment):
    with pytest.raises(InputError) as info:
        resolve(PretrainSettings, {}, write(tmp_path, text))
    assert fragment in str(info.value) and "\n" not in str(info.value)
    r = _cli(["pretrain", "--print-config", "--config", tmp_path / "exp.toml"])
    assert r.exit_code == 2 and fragment in r.stderr


def test_other_subcommands_tables_are_allowed(tmp_path):
    cfg = write(tmp_path, "epochs = 4\n[extract]\nnormalize = true\n[linear-eval]\nseeds = 3\n")
    assert resolve(PretrainSettings, {}, cfg).epochs == 4
    assert resolve(LinearEvalSettings, {"ckpt": "e.safetensors"}, cfg).seeds == 3


@pytest.mark.parametrize(
    "cls,name,value,expected",
    [
        (VisualizeSettings, "kind", "loss", ["loss"]),
        (VisualizeSettings, "kind", "loss,pca", ["loss", "pca"]),
        (VisualizeSettings, "kind", " loss , pca ", ["loss", "pca"]),
        (VisualizeSettings, "kind", '["loss", "tsne"]', ["loss", "tsne"]),
        (VisualizeSettings, "run", "runs/a,runs/b", [Path("runs/a"), Path("runs/b")]),
        (VisualizeSettings, "run", "runs/a", [Path("runs/a")]),
        (LinearEvalSettings, "label_fraction", "0.1,1", [0.1, 1.0]),
        (LinearEvalSettings, "label_fraction", "0.5", [0.5]),
        (LinearEvalSettings, "label_fraction", "[0.25, 1]", [0.25, 1.0]),
    ],
)
def test_list_settings_from_the_environment(monkeypatch, cls, name, value, expected):
    monkeypatch.setenv(f"CRLF_{name.upper()}", value)
    extra = {"ckpt": "e.safetensors"} if cls is LinearEvalSettings else {}
    assert getattr(resolve(cls, extra), name) == expected


@pytest.mark.parametrize("value", ["[loss", "shadow", "loss,[pca]"])
def test_bad_list_in_the_environment_is_an_input_error(monkeypatch, value):
    monkeypatch.setenv("CRLF_KIND", value)
    with pytest.raises(InputError, match="kind"):
        resolve(VisualizeSettings, {})
    r = _cli(["visualize", "--print-config"], {"CRLF_KIND": value})
    assert r.exit_code == 2 and "kind" in r.stderr and "Traceback" not in r.output


def test_list_env_from_the_cli():
    r = _cli(["visualize", "--print-config", "--json"], {"CRLF_KIND": "loss,pca", "CRLF_RUN": "r1"})
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["kind"] == ["loss", "pca"] and json.loads(r.stdout)["run"] == ["r1"]


def test_unknown_crlf_variables_warn_with_a_hint(monkeypatch):
    from crlf.settings import warn_unknown_env

    env = {"CRLF_EPOCS": "3", "CRLF_EPOCHS": "2", "CRLF_CONFIG": "x", "CRLF_DEBUG": "1", "CRLF_ZZZ": "1", "HOME": "/"}
    warnings = warn_unknown_env(env)
    assert len(warnings) == 2
    assert "CRLF_EPOCS" in warnings[0] and "did you mean CRLF_EPOCHS?" in warnings[0]
    assert "CRLF_ZZZ" in warnings[1] and "did you mean" not in warnings[1]
    r = _cli(["pretrain", "--print-config"], {"CRLF_BATCH_SIZ": "64", "CRLF_EPOCHS": "2"})
    assert r.exit_code == 0, r.output  # a warning, not a failure
    assert "warning: ignoring the environment variable CRLF_BATCH_SIZ" in r.stderr
    assert "did you mean CRLF_BATCH_SIZE?" in r.stderr and "epochs = 2" in r.stdout


def test_merge_takes_the_flags_given_then_the_saved_values_then_the_defaults():
    """visualize and explore fill data settings from a run's config.json: what the user gave wins, None is unset."""
    given = VisualizeSettings(run=[Path("r")], image_size=16)  # only image_size (and run) given
    saved = {"data": "folder", "data_dir": "photos", "image_size": 32, "limit": None, "epochs": 3}
    out = merge(DataSettings, given, saved, "settings of r are invalid")
    assert (out.data, str(out.data_dir), out.image_size, out.limit) == ("folder", "photos", 16, DataSettings().limit)
    with pytest.raises(InputError, match="^settings of r are invalid: "):
        merge(DataSettings, VisualizeSettings(run=[Path("r")]), {"image_size": 1}, "settings of r are invalid")


# --- hardening, second pass: one-line messages, booleans, every unknown key, choices ------------------------------
def test_a_newline_in_a_value_stays_on_the_error_line():
    """CRLF_DEVICE=$'cpu\\n' printed the value raw, over two lines."""
    with pytest.raises(InputError) as info:
        resolve(PretrainSettings, {"device": "cpu\n", "arch": "res\x1bnet"})
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "unknown device 'cpu\\n'" in str(info.value) and "unknown arch 'res\\x1bnet'" in str(info.value)
    r = _cli(["pretrain", "--print-config"], {"CRLF_DEVICE": "cpu\n"})
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "unknown device 'cpu\\n'" in r.stderr, r.stderr


def test_every_message_the_cli_prints_is_one_line(capsys):
    from crlf import output
    from crlf.errors import one_line

    assert one_line("a\nb\r\tc\x1b[31m\u2028d ü") == "a\\nb\\r\\tc\\x1b[31m\\u2028d ü"
    output.error("bad value 'x\ny'")
    assert capsys.readouterr().err == "error: bad value 'x\\ny'\n"


@pytest.mark.parametrize(
    "text,name",
    [
        ("epochs = true\n", "epochs"),
        ("lr = false\n", "lr"),
        ("[linear-eval]\nlabel_fraction = [true]\n", "label-fraction"),
    ],
)
def test_a_boolean_is_not_a_number_in_a_config_file(tmp_path, text, name):
    """`epochs = true` was taken as 1 epoch."""
    cls = LinearEvalSettings if "linear-eval" in text else PretrainSettings
    with pytest.raises(InputError, match=f"{name}: must be a number, not true / false"):
        resolve(cls, {"ckpt": "e.safetensors"} if cls is LinearEvalSettings else {}, write(tmp_path, text))


def test_a_boolean_is_not_a_number_anywhere_else(monkeypatch):
    with pytest.raises(InputError, match="epochs: must be a number"):
        resolve(PretrainSettings, {"epochs": True})  # the Python API
    monkeypatch.setenv("CRLF_EPOCHS", "true")
    with pytest.raises(InputError, match="epochs"):
        resolve(PretrainSettings, {})
    monkeypatch.delenv("CRLF_EPOCHS")
    s = resolve(
        PretrainSettings, {"download": False, "compile": True, "stream": True, "data": "folder", "data_dir": "x"}
    )
    assert (s.download, s.compile, s.stream) == (False, True, True)  # booleans still go where booleans go


def test_every_unknown_key_and_table_is_reported_with_its_hint(tmp_path):
    """Two unknown keys and an unknown table reported the table only, and a hint for the first key only."""
    cfg = write(
        tmp_path, "epocs = 3\nbatch_sise = 8\n[trainin]\nx = 1\n[pretrain]\nlrr = 1\n[extract]\nnormalise = 1\n"
    )
    with pytest.raises(InputError) as info:
        resolve(PretrainSettings, {}, cfg)
    message = str(info.value)
    for fragment in (
        f"config file {str(cfg)!r}: ",
        "unknown setting 'epocs' (did you mean 'epochs'?)",
        "unknown setting 'batch_sise' (did you mean 'batch_size'?)",
        "unknown table [trainin]",
        "[pretrain] has unknown setting 'lrr' (did you mean 'lr'?)",
        "[extract] has unknown setting 'normalise' (did you mean 'normalize'?)",
        "crlf pretrain --help and crlf extract --help list the settings",
        "the tables are [pretrain], [extract]",
    ):
        assert fragment in message, (fragment, message)
    assert "\n" not in message


def test_config_file_paths_are_quoted(tmp_path):
    with pytest.raises(InputError, match=r"^config file '.*missing\.toml' does not exist$"):
        resolve(PretrainSettings, {}, tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "cls,values,expected",
    [
        (
            VisualizeSettings,
            {"kind": ["bogus"]},
            "kind: 'bogus' is not one of loss, pca, tsne, umap, confusion, neighbors",
        ),
        (
            VisualizeSettings,
            {"kind": ["loss", "tnse"]},
            "kind: 'tnse' is not one of loss, pca, tsne, umap, confusion, "
            "neighbors, augmentations, reconstructions (did you mean 'tsne'?)",
        ),
        (
            PretrainSettings,
            {"method": "simclar"},
            "method: 'simclar' is not one of simclr, moco, byol, simsiam, barlow, "
            "vicreg, dino, swav, distill, mae, ibot (did you mean 'simclr'?)",
        ),
        (PretrainSettings, {"precision": "fp8"}, "precision: 'fp8' is not one of auto, bf16, fp16, fp32"),
    ],
)
def test_a_wrong_choice_names_the_setting_and_lists_the_choices(cls, values, expected):
    """`--kind bogus` showed pydantic's location `kind.0`."""
    with pytest.raises(InputError) as info:
        resolve(cls, values)
    assert expected in str(info.value) and "kind.0" not in str(info.value) and "kind.1" not in str(info.value)


def test_a_rejected_value_is_shown_once():
    """`--label-fraction 1.5` printed [1.5] twice; so did --device and --arch their value."""
    for values, shown in [
        ({"ckpt": "e.safetensors", "label_fraction": [1.5, 0.5]}, "[1.5, 0.5]"),
        ({"ckpt": "e.safetensors", "device": "tpu"}, "'tpu'"),
    ]:
        with pytest.raises(InputError) as info:
            resolve(LinearEvalSettings, values)
        assert str(info.value).count(shown) == 1, str(info.value)


def test_merge_names_each_problem_like_resolve():
    """A run's config.json with a bad value gave pydantic's bare message, of the first problem only."""
    with pytest.raises(InputError) as info:
        merge(DataSettings, VisualizeSettings(run=[Path("r")]), {"image_size": 1, "data": "imagenet"}, "settings of r")
    assert "data: 'imagenet' is not one of digits" in str(info.value) and "image-size: " in str(info.value)
