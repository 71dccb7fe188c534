"""Settings fields -> Typer options: each subcommand's flags are generated from its Pydantic settings model, so a
flag, its env var, its TOML key and its --help text cannot drift apart. Only flags the user typed are passed on
(they default to None), which is what gives the precedence CLI > CRLF_* env > --config file > defaults. Also the
options every subcommand shares (Annotated aliases) and the help panels."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.markup import escape

from crlf.options import (
    AugmentSettings,
    DataSettings,
    DeviceSettings,
    KnnSettings,
    MemorySettings,
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
    LinearEvalSettings,
    VisualizeSettings,
)

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
    (MemorySettings, "Memory"),
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



def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help())
        raise typer.Exit()


# click's own --help shows a "<bool>" type; this one does not
HelpOpt = Annotated[
    bool,
    typer.Option(
        "--help", "-h", is_eager=True, expose_value=True, callback=_show_help, metavar="",
        help="Show this message and exit.",
    ),
]



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


def _field_help(name: str, field: Any, kind: Any, choices: tuple[str, ...]) -> str:
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
        # a bool's --no- form, but for a long flag (its column would make every option of the panel wrap)
        negative = kind is bool and len(flag) <= 20
        decls = [f"{flag}/--no-{flag[2:]}"] if negative else [flag, f"-{name}"] if len(name) == 1 else [flag]
        choices = _choices(field.annotation)
        opt = typer.Option(
            *decls,
            help=_field_help(name, field, kind, choices),
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


def settings_command(
    app: typer.Typer, name: str, model: type[BaseModel], extra: Callable[..., Any], help: str
) -> None:
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


