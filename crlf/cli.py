"""The Typer app: one thin function per subcommand (settings -> engine call -> output).

Each subcommand's options are generated from its Pydantic settings model, so a flag, its env var, its TOML
key and its --help text cannot drift apart. Only flags the user typed are passed on (they default to None),
which is what gives the precedence CLI > CRLF_* env > --config file > defaults.
"""

import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from crlf import __version__, output
from crlf.errors import CrlfError, InputError
from crlf.settings import (
    AugmentSettings,
    DataSettings,
    DeviceSettings,
    EmbeddingsInput,
    EncoderInput,
    ExtractSettings,
    KnnEvalSettings,
    KnnSettings,
    LinearEvalSettings,
    ModelSettings,
    OptimSettings,
    PretrainSettings,
    RunSettings,
    VisualizeSettings,
    resolve,
    to_toml,
)

app = typer.Typer(
    name="crlf",
    help="Contrastive Representation Learning Framework: self-supervised image encoders (SimCLR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_PANELS = [
    (VisualizeSettings, "Figures"),
    (LinearEvalSettings, "Linear probe"),
    (ExtractSettings, "Output"),
    (EncoderInput, "Encoder"),
    (EmbeddingsInput, "Embeddings"),
    (DataSettings, "Data"),
    (ModelSettings, "Model"),
    (AugmentSettings, "Augmentation"),
    (OptimSettings, "Optimisation"),
    (KnnSettings, "kNN"),
    (DeviceSettings, "Device"),
    (RunSettings, "Run directory"),
]

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="CRLF_CONFIG",
        help="TOML file of settings (flat keys, or a table named after the subcommand).",
        rich_help_panel="Output",
    ),
]
PrintConfigOpt = Annotated[
    bool,
    typer.Option(
        "--print-config",
        help="Print the resolved settings as TOML (JSON with --json) and exit.",
        rich_help_panel="Output",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write the result to stdout as JSON.", rich_help_panel="Output")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.", rich_help_panel="Output")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug messages on stderr.", rich_help_panel="Output")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"crlf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Contrastive Representation Learning Framework: self-supervised image encoders (SimCLR)."""


def _panel(model: type[BaseModel], name: str) -> str:
    """The help panel of a field: named after the settings class that declares it."""
    owner = next((c for c in model.__mro__ if name in c.__dict__.get("__annotations__", {})), model)
    return dict(_PANELS).get(owner, "Options")


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses a field as: numbers, booleans and lists of floats natively, the rest as text for Pydantic."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = (
        args[0]
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else annotation
    )
    if typing.get_origin(base) is list:  # a repeatable flag
        return list[float] if typing.get_args(base) == (float,) else list[str]
    return base if base in (int, float, bool) else str


def settings_options(model: type[BaseModel]) -> list[inspect.Parameter]:
    """One keyword parameter (a Typer option, default None = not given) per settings field."""
    params = []
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _cli_type(field.annotation)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag, f"-{name}"] if len(name) == 1 else [flag]
        default = field.default
        shown = False if default is None or default is PydanticUndefined else str(default)
        opt = typer.Option(*decls, help=field.description, show_default=shown, rich_help_panel=_panel(model, name))
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, opt]
            )
        )
    return params


def settings_command(name: str, model: type[BaseModel], extra: Callable[..., Any], help: str) -> None:
    """Register `extra` (which declares the non-setting options) as a subcommand taking every settings field too."""
    own = list(inspect.signature(extra).parameters.values())

    def command(**kwargs: Any) -> None:
        settings_values = {k: kwargs.pop(k) for k in list(kwargs) if k in model.model_fields}
        extra(settings_values=settings_values, **kwargs)

    command.__signature__ = inspect.Signature([p for p in own if p.name != "settings_values"] + settings_options(model))  # type: ignore[attr-defined]
    command.__doc__ = help
    app.command(name, help=help)(command)


def _guarded(quiet: bool, verbose: bool, work: Callable[[], int | None]) -> None:
    """Run `work`, turning known failures into one line and their exit code (CRLF_DEBUG=1 shows tracebacks)."""
    output.setup_logging(quiet=quiet, verbose=verbose)
    debug = os.environ.get("CRLF_DEBUG", "") not in ("", "0")
    try:
        code = work()
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
                f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set CRLF_DEBUG=1 for the traceback)"
            )
        raise typer.Exit(1) from None
    if code:
        raise typer.Exit(code)


def _resolved(cls: type, values: dict[str, Any], config: Path | None, print_config: bool, json: bool) -> Any:
    """Resolve the settings; with --print-config print them (TOML, or JSON with --json) and return None."""
    settings = resolve(cls, values, config)
    if not print_config:
        return settings
    if json:
        output.emit_json(settings.model_dump(mode="json"))
    else:
        sys.stdout.write(to_toml(settings))
    return None


def _pretrain(
    settings_values: dict[str, Any],
    config: ConfigOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last checkpoint; do nothing if it is complete; start fresh if it has none.",
            rich_help_panel="Output",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Discard the run already in --out and start over.", rich_help_panel="Output")
    ] = False,
    print_config: PrintConfigOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    def work() -> None:
        settings = _resolved(PretrainSettings, settings_values, config, print_config, json)
        if settings is None:
            return
        from crlf.engine.train import pretrain  # torch is imported only when there is work to do

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
                "done: %d epochs, final loss %s, encoder in %s",
                summary["epochs"],
                summary["final_loss"],
                summary["encoder"],
            )

    _guarded(quiet, verbose, work)


settings_command(
    "pretrain",
    PretrainSettings,
    _pretrain,
    "Pretrain an image encoder without labels (SimCLR) and write a run directory.",
)


def _command(cls: type, run: Callable[[Any, bool, bool], Any]) -> Callable[..., None]:
    """A subcommand with the common options: resolve the settings (or print them), `run(settings, json, quiet)`
    (which imports torch only when there is work), and print its result as JSON with --json."""

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
            if settings is None:
                return
            result = run(settings, json, quiet)
            if json:
                output.emit_json(result)

        _guarded(quiet, verbose, work)

    return command


def _extract(settings: ExtractSettings, json: bool, quiet: bool) -> dict[str, Any]:
    if json and settings.out == "-":
        raise InputError("--json and --out - both want stdout: write the embeddings to a file, or drop --json")
    from crlf.engine.embeddings import extract

    return extract(settings, sys.stdout.buffer)


def _evaluation(name: str) -> Callable[[Any, bool, bool], dict[str, Any]]:
    def run(settings: Any, json: bool, quiet: bool) -> dict[str, Any]:
        from crlf.engine import embeddings

        result = getattr(embeddings, name)(settings)
        if not quiet:
            output.results_table(result)
        return result

    return run


def _visualize(settings: VisualizeSettings, json: bool, quiet: bool) -> dict[str, Any]:
    from crlf.engine.visualize import visualize

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
    "Figures: loss curves, PCA / t-SNE maps, confusion matrix, nearest neighbours, augmented views; --run DIR draws them all with an index.html.",
)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="crlf")
