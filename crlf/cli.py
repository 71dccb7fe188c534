"""The Typer app: one thin function per subcommand (settings -> a command of crlf.commands -> output). The flags
come from the settings models (crlf.flags); failures become one line and an exit code (crlf.guard)."""

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from crlf import __version__, output
from crlf.errors import InputError
from crlf.flags import (
    COMMON,
    ConfigOpt,
    HelpOpt,
    JsonOpt,
    PrintConfigOpt,
    QuietOpt,
    VerboseOpt,
    settings_command,
)
from crlf.guard import guarded
from crlf.options import DeviceSettings
from crlf.settings import (
    ExploreSettings,
    ExportSettings,
    ExtractSettings,
    KnnEvalSettings,
    LinearEvalSettings,
    PretrainSettings,
    VisualizeSettings,
    pretrain_model,
    resolve,
    settings_values,
    to_toml,
)

app = typer.Typer(
    name="crlf",
    help="Contrastive Representation Learning Framework: self-supervised image encoders (SimCLR, MoCo, BYOL, "
    "SimSiam, Barlow Twins, VICReg, DINO, SwAV).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Help panels, in the order they are shown: the options most runs set come first (in the "Options" panel, which
# also holds --help), then one panel per settings group, named after the class that declares the field.
def _version(value: bool) -> None:
    if value:
        typer.echo(f"crlf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_version, metavar="", help="Print the version and exit."),
    ] = False,
    help_: HelpOpt = False,
) -> None:
    """Contrastive Representation Learning Framework: self-supervised image encoders."""



def _resolved(cls: type, values: dict[str, Any], config: Path | None, print_config: bool, json: bool) -> Any:
    """Resolve the settings; with --print-config print them (TOML, or JSON with --json) and return None."""
    settings = resolve(cls, values, config)
    if not print_config:  # (pretrain fills in the method's defaults itself)
        return settings
    if isinstance(settings, PretrainSettings):  # the method's defaults for what was left unset
        from crlf.commands.pretrain import resolve as method_defaults

        settings = method_defaults(settings)
    resolved = {}
    if isinstance(settings, DeviceSettings):  # what 'auto' turns into here (imports torch: printing only)
        from crlf.engine.device import describe

        resolved = describe(settings.device, settings.precision)
    if json:
        output.emit_json({**settings_values(settings), **({"resolved": resolved} if resolved else {})})
    else:
        note = "".join(f"# {k}: {v}\n" for k, v in resolved.items())
        sys.stdout.write(("# resolved on this machine (not read back):\n" + note if note else "") + to_toml(settings))
    return None


def _pretrain(
    settings_values: dict[str, Any],
    config: ConfigOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out (a no-op when it is complete; fresh when it has no checkpoint).",
            metavar="",
            rich_help_panel=COMMON,
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Discard the run in --out and start over.", metavar="", rich_help_panel=COMMON),
    ] = False,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    def work() -> None:
        settings = _resolved(pretrain_model(), settings_values, config, print_config, json)
        if settings is None:
            return
        from crlf.commands.pretrain import pretrain  # torch is imported only when there is work to do

        reporter = output.TrainingReporter(quiet=quiet, bar=not json, log_every=settings.log_every)
        try:
            summary = pretrain(settings, reporter, resume=resume, force=force, hard_abort=True)
        finally:
            reporter.close()
        if summary.get("rank", 0) != 0:
            return  # torchrun: the main process alone reports
        if json:
            output.emit_json(summary)
        elif summary["status"] == "trained":
            output.log.info(
                "done: %d epoch%s, final loss %s, encoder in %s",
                summary["epochs"],
                "" if summary["epochs"] == 1 else "s",
                summary["final_loss"],
                summary["encoder"],
            )

    guarded(quiet, verbose, work)


def _pretrain_command() -> None:
    """(Re-)register pretrain with a flag for every option of every registered method."""
    app.registered_commands[:] = [c for c in app.registered_commands if c.name != "pretrain"]
    settings_command(
        app,
        "pretrain",
        pretrain_model(),
        _pretrain,
        "Pretrain an image encoder without labels (--method: simclr, moco, byol, ...) and write a run directory.",
    )


_pretrain_command()


def _common(cls: type, body: Callable[[Any, bool, bool], None]) -> Callable[..., None]:
    """A subcommand with the common options: resolve the settings (or print them), then `body(settings, json, quiet)`,
    with crlf's error handling."""

    def command(
        settings_values: dict[str, Any],
        config: ConfigOpt = None,
        print_config: PrintConfigOpt = False,
        json: JsonOpt = False,
        quiet: QuietOpt = False,
        verbose: VerboseOpt = False,
    ) -> None:
        def work() -> None:
            settings = _resolved(cls, settings_values, config, print_config, json)
            if settings is not None:
                body(settings, json, quiet)

        guarded(quiet, verbose, work)

    return command


def _command(cls: type, run: Callable[[Any, bool, bool], Any]) -> Callable[..., None]:
    """A subcommand that runs `run(settings, json, quiet)` (which imports torch only when there is work) with the
    engine's progress shown, and prints its result as JSON with --json."""

    def body(settings: Any, json: bool, quiet: bool) -> None:
        with output.engine_progress(quiet=quiet, bar=not json):  # embedding, probes, t-SNE: bars or lines
            result = run(settings, json, quiet)
        if json:
            output.emit_json(result)

    return _common(cls, body)


def _extract(settings: ExtractSettings, json: bool, quiet: bool) -> dict[str, Any]:
    if json and settings.out == "-":
        raise InputError("--json and --out - both want stdout: write the embeddings to a file, or drop --json")
    if settings.out == "-" and sys.stdout.isatty():  # as gzip: binary data would garble the terminal
        raise InputError("--out - writes binary .npy data to stdout, which is a terminal: redirect it "
                         "(crlf extract ... --out - > emb.npy), pipe it, or give --out FILE")  # fmt: skip
    from crlf.commands.extract import extract

    return extract(settings, sys.stdout.buffer)


def _evaluation(name: str) -> Callable[[Any, bool, bool], dict[str, Any]]:
    def run(settings: Any, json: bool, quiet: bool) -> dict[str, Any]:
        from crlf.commands import evaluate as embeddings

        result = getattr(embeddings, name)(settings)
        if not quiet:
            output.results_table(result)
        return result

    return run


def _visualize(settings: VisualizeSettings, json: bool, quiet: bool) -> dict[str, Any]:
    from crlf.commands.visualize import visualize

    return visualize(settings)


settings_command(
    app,
    "extract",
    ExtractSettings,
    _command(ExtractSettings, _extract),
    "Embed a data set with a saved encoder: .npy (+ .json provenance), .npz, or .npy on stdout.",
)
settings_command(
    app,
    "linear-eval",
    LinearEvalSettings,
    _command(LinearEvalSettings, _evaluation("linear_eval")),
    "Linear probe on frozen features (or --finetune): top-1, top-5, per-class accuracy, confusion matrix.",
)
settings_command(
    app,
    "knn-eval",
    KnnEvalSettings,
    _command(KnnEvalSettings, _evaluation("knn_eval")),
    "Weighted kNN classification on cosine similarity (k = 200, temperature 0.1).",
)
settings_command(
    app,
    "visualize",
    VisualizeSettings,
    _command(VisualizeSettings, _visualize),
    "Figures: loss curves, PCA / t-SNE maps, confusion matrix, nearest neighbours, augmented views; "
    "--run DIR draws them all with an index.html.",
)


def _explore(settings: ExploreSettings, json: bool, quiet: bool) -> None:
    """Embed and map the space (with progress), print the URL (and the JSON with --json), then serve until stopped:
    serving is outside the progress block, which the other subcommands keep for their whole run."""
    try:
        from crlf import explore_app
    except ModuleNotFoundError as e:
        if e.name not in ("flask", "werkzeug"):
            raise
        raise InputError("crlf explore needs Flask: pip install 'crlf[explore]'") from None
    from crlf.commands.explore import open_space

    sock = explore_app.bind(settings.host, settings.port)  # a port in use fails now, not after the embedding
    with output.engine_progress(quiet=quiet, bar=not json):
        space = open_space(settings)
    hosts = explore_app.allowed_hosts(settings.host, settings.allow_host)
    app = explore_app.create_app(space, settings.neighbors, round(settings.max_upload_mb * 1e6), hosts)
    server = explore_app.start(app, sock, settings.host)
    if json:
        output.emit_json(explore_app.summary(server, space))
    explore_app.serve(server, settings.open)


settings_command(
    app,
    "explore",
    ExploreSettings,
    _common(ExploreSettings, _explore),
    "Browse an embedding space in the web browser: a 2-D map with thumbnails, nearest neighbours, search, and "
    "queries with your own images (needs Flask: the explore extra).",
)


def _export(settings: ExportSettings, json: bool, quiet: bool) -> dict[str, Any]:
    from crlf.commands.export import export

    done = export(settings)
    if not json:
        output.log.info("wrote %s (%s, %s bytes); largest difference to the PyTorch encoder's features: %.3g",
                        done["path"], done["format"], f"{done['bytes']:,}", done["max_diff"])  # fmt: skip
    return done


settings_command(
    app,
    "export",
    ExportSettings,
    _command(ExportSettings, _export),
    "Export an encoder for deployment: ONNX or TorchScript with its preprocessing inside, or a Hugging Face folder.",
)


def _registered_fields(name: str) -> set[str]:
    """The settings fields the registered subcommand `name` takes as options."""
    info = next(c for c in app.registered_commands if c.name == name)
    return set(inspect.signature(info.callback).parameters)  # type: ignore[arg-type]


def _click_errors() -> tuple[type[Exception], ...]:
    """click's exception base: Typer >= 0.22 bundles click as typer._click; older Typers raise click's own."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return tuple(found)


def _usage_line(e: Exception) -> str:
    """A click usage error as one line: "no such option: --epoch (did you mean --epochs?); see 'crlf pretrain
    --help'" instead of the usage box."""
    possibilities = getattr(e, "possibilities", None)
    text = getattr(e, "message", "") if possibilities else e.format_message()  # type: ignore[attr-defined]
    text = " ".join(str(text).split()).rstrip(".") or type(e).__name__
    if ". Did you mean " in text:  # no such command 'pretrian'. Did you mean 'pretrain'?
        text = "{} (did you mean {})".format(*text.split(". Did you mean ", 1))
    if text[:2].istitle():  # "No such option" -> "no such option"; "JSON ..." stays
        text = text[0].lower() + text[1:]
    if possibilities:
        text += f" (did you mean {possibilities[0]}?)"  # click lists the closest match first
    ctx = getattr(e, "ctx", None)
    return text + (f"; see '{ctx.command_path} --help'" if ctx is not None else "")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Usage errors (unknown option or command, bad or missing value) are one line
    on stderr with exit code 2, like every other error, instead of click's usage box."""
    if not pretrain_model().model_fields.keys() <= _registered_fields("pretrain"):  # a method registered since
        _pretrain_command()
    try:
        code = app(args=argv, prog_name="crlf", standalone_mode=False)
    except _click_errors() as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `crlf`: the help, as before
            typer.echo(ctx.get_help())
        else:
            output.error(_usage_line(e))
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        output.error("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
