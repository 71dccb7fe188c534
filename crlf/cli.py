"""The Typer app: one thin function per subcommand (settings -> engine call -> output).

Each subcommand's options are generated from its Pydantic settings model, so a flag, its env var, its TOML
key and its --help text cannot drift apart. Only flags the user typed are passed on (they default to None),
which is what gives the precedence CLI > CRLF_* env > --config file > defaults.
"""

import contextlib
import inspect
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.markup import escape

from crlf import __version__, output
from crlf.errors import CrlfError, InputError
from crlf.options import (
    AugmentSettings,
    DataSettings,
    DeviceSettings,
    KnnSettings,
    MethodSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
)
from crlf.settings import (
    EmbeddingsInput,
    EncoderInput,
    ExploreSettings,
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
COMMON = "Options"
_COMMON = (
    *("ckpt", "train_emb", "test_emb", "emb", "run", "kind", "data", "data_dir", "epochs", "batch_size", "device"),
    *("out", "resume", "force", "config", "json"),
)
_PANELS = [
    (VisualizeSettings, "Figures"),
    (ExploreSettings, "Explorer"),
    (LinearEvalSettings, "Linear probe"),
    (EncoderInput, "Encoder"),
    (EmbeddingsInput, "Embeddings"),
    (DataSettings, "Data"),
    (ModelSettings, "Model"),
    (AugmentSettings, "Augmentation"),
    (OptimSettings, "Optimisation"),
    (MethodSettings, "Method"),
    (KnnSettings, "kNN"),
    (DeviceSettings, "Device"),
    (RunSettings, "Run directory"),
    (ExtractSettings, "Output"),
]

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="CRLF_CONFIG",
        show_envvar=False,
        metavar="FILE",
        help="TOML settings file (flat keys, or a table named after the subcommand). \\[env: CRLF_CONFIG]",
        rich_help_panel=COMMON,
    ),
]
PrintConfigOpt = Annotated[
    bool,
    typer.Option(
        "--print-config",
        help="Print the resolved settings as TOML (JSON with --json) and exit.",
        metavar="",
        rich_help_panel="Output",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Write the result to stdout as JSON.", metavar="", rich_help_panel=COMMON)
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.", metavar="", rich_help_panel="Output"),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug messages on stderr.", metavar="", rich_help_panel="Output")
]



def _help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help())
        raise typer.Exit()


# click's own --help shows a "<bool>" type; this one does not
HelpOpt = Annotated[
    bool,
    typer.Option(
        "--help", "-h", is_eager=True, expose_value=True, callback=_help, metavar="", help="Show this message and exit."
    ),
]


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


def _panel(model: type[BaseModel], name: str) -> str:
    """The help panel of a field: named after the settings class that declares it."""
    owner = next((c for c in model.__mro__ if name in c.__dict__.get("__annotations__", {})), model)
    return dict(_PANELS).get(owner, "Options")


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses a field as: numbers, booleans and lists of floats natively, the rest as text for
    Pydantic."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = (
        args[0]
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else annotation
    )
    if typing.get_origin(base) is list:  # a repeatable flag
        return list[float] if typing.get_args(base) == (float,) else list[str]
    return base if base in (int, float, bool) else str


def _choices(annotation: Any) -> tuple[str, ...]:
    """The allowed values of a Literal field (also inside Optional[...] or list[...]); () for other types."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return next((c for a in typing.get_args(annotation) if (c := _choices(a))), ())


def _metavar(annotation: Any, kind: Any) -> str:
    """The short value placeholder of --help: N (integer), X (number), PATH, TEXT; nothing for a flag."""
    if kind is bool:
        return ""
    inner = typing.get_args(annotation)
    if Path in (annotation, *inner) or any(Path in typing.get_args(a) for a in inner):
        return "PATH"
    return {int: "N", float: "X", list[float]: "X"}.get(kind, "TEXT")


def _help(name: str, field: Any, kind: Any, choices: tuple[str, ...]) -> str:
    """--help text of a field: its description, the choices unless it names them, the default, the env variable."""
    text = field.description or ""
    if choices and not all(c in text for c in choices):
        text += f" One of: {', '.join(choices)}."
    default = field.default
    if kind is bool:
        shown = "on" if default is True else None
    elif default is None or default is PydanticUndefined or default == []:
        shown = None
    else:
        shown = ", ".join(map(str, default)) if isinstance(default, list) else str(default)
    text += f" [default: {shown}]" if shown is not None else ""
    return escape(f"{text} [env: CRLF_{name.upper()}]")


def settings_options(model: type[BaseModel]) -> list[inspect.Parameter]:
    """One keyword parameter (a Typer option, default None = not given) per settings field.

    Pydantic validates every value (choices included) and reads the CRLF_* variables, so Typer parses only numbers
    and flags; --help still shows each field's choices, default and environment variable.
    """
    params = []
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _cli_type(field.annotation)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag, f"-{name}"] if len(name) == 1 else [flag]
        choices = _choices(field.annotation)
        opt = typer.Option(
            *decls,
            help=_help(name, field, kind, choices),
            show_default=False,
            metavar=_metavar(field.annotation, kind),
            rich_help_panel=COMMON if name in _COMMON else _panel(model, name),
        )
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, opt]
            )
        )
    return params


def _help_order(param: inspect.Parameter) -> tuple[int, int]:
    """Sort key of a subcommand's options: the common ones first (in _COMMON's order), then panel by panel."""
    if param.name in _COMMON:
        return 0, _COMMON.index(param.name)
    if param.name == "show_help":
        return 0, len(_COMMON)
    info = next((m for m in typing.get_args(param.annotation)[1:] if hasattr(m, "rich_help_panel")), None)
    panels = [name for _, name in _PANELS]
    panel = getattr(info, "rich_help_panel", None)
    return 1 + (panels.index(panel) if panel in panels else len(panels)), 0


def settings_command(name: str, model: type[BaseModel], extra: Callable[..., Any], help: str) -> None:
    """Register `extra` (which declares the non-setting options) as a subcommand taking every settings field too."""
    own = list(inspect.signature(extra).parameters.values())

    def command(**kwargs: Any) -> None:
        kwargs.pop("show_help", None)
        settings_values = {k: kwargs.pop(k) for k in list(kwargs) if k in model.model_fields}
        extra(settings_values=settings_values, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name != "settings_values"]
    params.append(inspect.Parameter("show_help", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=HelpOpt))
    params = sorted(params + settings_options(model), key=_help_order)  # stable: declaration order within a panel
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = help
    app.command(name, help=help)(command)


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds the work like Ctrl-C's KeyboardInterrupt (past `except Exception`, through the
    clean-ups of atomic writes and run directories)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises _Terminated in the main thread instead of killing the process outright
    (pretrain's loop installs its own handler, which saves a checkpoint first). Any exception that ends the block
    after the signal becomes _Terminated: C code can turn the handler's exception into its own (numpy's writer into
    'seeking file failed'). A second SIGTERM, or one that reaches a forked worker that inherited the handler, ends
    the process as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid, received = os.getpid(), []

    def handle(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous)
        if os.getpid() != pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        raise _Terminated

    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python
    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except Exception:
        if received:
            raise _Terminated from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded(quiet: bool, verbose: bool, work: Callable[[], int | None]) -> None:
    """Run `work`, turning known failures into one line and their exit code (CRLF_DEBUG=1 shows tracebacks); SIGINT
    exits 130 and SIGTERM 143."""
    output.setup_logging(quiet=quiet, verbose=verbose)
    debug = os.environ.get("CRLF_DEBUG", "") not in ("", "0")
    try:
        with _sigterm_raises():
            code = work()
    except _Terminated:
        output.error("stopped by SIGTERM")
        raise typer.Exit(128 + signal.SIGTERM) from None
    except CrlfError as e:
        if debug:
            raise
        output.error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        output.error("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        if type(e).__name__ == "OutOfMemoryError":
            output.error("out of memory on the device; try a smaller --batch-size")
        else:
            output.error(
                f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                "(set CRLF_DEBUG=1 for the traceback)"
            )
        raise typer.Exit(1) from None
    if code:
        raise typer.Exit(code)


def _resolved(cls: type, values: dict[str, Any], config: Path | None, print_config: bool, json: bool) -> Any:
    """Resolve the settings; with --print-config print them (TOML, or JSON with --json) and return None."""
    settings = resolve(cls, values, config)
    if isinstance(settings, PretrainSettings):  # the method's defaults for what was left unset
        from crlf.commands.pretrain import resolve as method_defaults

        settings = method_defaults(settings)
    if not print_config:
        return settings
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

    _guarded(quiet, verbose, work)


def _pretrain_command() -> None:
    """(Re-)register pretrain with a flag for every option of every registered method."""
    app.registered_commands[:] = [c for c in app.registered_commands if c.name != "pretrain"]
    settings_command(
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

        _guarded(quiet, verbose, work)

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
    "extract",
    ExtractSettings,
    _command(ExtractSettings, _extract),
    "Embed a data set with a saved encoder: .npy (+ .json provenance), .npz, or .npy on stdout.",
)
settings_command(
    "linear-eval",
    LinearEvalSettings,
    _command(LinearEvalSettings, _evaluation("linear_eval")),
    "Linear probe on frozen features (or --finetune): top-1, top-5, per-class accuracy, confusion matrix.",
)
settings_command(
    "knn-eval",
    KnnEvalSettings,
    _command(KnnEvalSettings, _evaluation("knn_eval")),
    "Weighted kNN classification on cosine similarity (k = 200, temperature 0.1).",
)
settings_command(
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
    "explore",
    ExploreSettings,
    _common(ExploreSettings, _explore),
    "Browse an embedding space in the web browser: a 2-D map with thumbnails, nearest neighbours, search, and "
    "queries with your own images (needs Flask: the explore extra).",
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
