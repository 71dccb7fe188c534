"""Where settings come from besides the flags: the ``--config`` TOML file and the ``CRLF_*`` environment variables,
and the checks that name every unknown key or variable (with the closest name) instead of ignoring it."""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from crlf.errors import InputError, did_you_mean, quoted

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)

config_file: ContextVar[Path | None] = ContextVar("crlfconfig_file", default=None)


class TomlSource(PydanticBaseSettingsSource):
    """Values from the ``--config`` TOML file (flat keys, or one ``[pretrain]``-style table)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, section: str):
        super().__init__(settings_cls)
        self.values = read_toml(path, section) if path is not None else {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_toml(path: Path, section: str) -> dict[str, Any]:
    """Read a config file; a table named after the subcommand (e.g. ``[pretrain]``) is merged over the top level."""
    shown = quoted(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file {shown} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read config file {shown}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {shown} is not valid TOML: {e}") from None
    _check_keys(data, section, shown)
    table = data.pop(section, {})
    if not isinstance(table, dict):
        raise InputError(f"config file {shown}: '{section}' must be a table")
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    # flat keys are shared by every subcommand: each takes its own and passes over the others' (a key that no
    # subcommand knows is still an error); keys in the subcommand's own table are all checked by its model
    mine = next((c for c in COMMANDS if c.section == section), None)
    if mine is not None:
        flat = {k: v for k, v in flat.items() if k in mine.model_fields}
    return {**flat, **table}


def _check_keys(data: dict[str, Any], section: str, shown: str) -> None:
    """One InputError naming every unknown key and table of a config file, each with its closest name."""
    sections = [c.section for c in COMMANDS]
    known = set().union(*(c.model_fields for c in COMMANDS))
    flat = sorted(k for k, v in data.items() if not isinstance(v, dict) and k not in known)
    problems = [f"unknown setting {k!r}{did_you_mean(k, known)}" for k in flat]
    helps = [section] if flat else []  # the subcommands whose --help lists the settings meant
    tables = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in sections)
    problems += [f"unknown table [{t}]{did_you_mean(t, sections, '[{}]')}" for t in tables]
    for other in COMMANDS:
        keys = data.get(other.section)
        bad = sorted(set(keys) - set(other.model_fields)) if isinstance(keys, dict) else []
        problems += [f"[{other.section}] has unknown setting {k!r}{did_you_mean(k, other.model_fields)}" for k in bad]
        helps += [other.section] if bad and other.section not in helps else []
    if helps:
        verb = "lists" if len(helps) == 1 else "list"
        problems.append(" and ".join(f"crlf {h} --help" for h in helps) + f" {verb} the settings")
    if tables:
        problems.append(f"the tables are {', '.join(f'[{s}]' for s in sections)} (one per subcommand) and keys "
                        "above them are shared")  # fmt: skip
    if problems:
        raise InputError(f"config file {shown}: {'; '.join(problems)}")


class EnvSource(EnvSettingsSource):
    """``CRLF_*`` variables. A list setting takes a JSON list, or the natural forms: one value (``CRLF_KIND=loss``)
    or values separated by commas (``CRLF_LABEL_FRACTION=0.1,1``)."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                return value  # validation then names the setting: "Input should be a valid list"
        return [part.strip() for part in value.split(",") if part.strip()]


ENV_READ_ELSEWHERE = ("CRLF_CONFIG", "CRLF_DEBUG")  # variables the CLI reads itself (not settings)


def warn_unknown_env(environ: Any = None) -> list[str]:
    """Warn (do not fail) about each ``CRLF_*`` variable that no subcommand reads, with the closest name; returns
    the warnings. Test hooks (``CRLF_TEST_*``) are left alone."""
    fields = sorted({name.upper() for c in COMMANDS for name in c.model_fields})
    known = {f"CRLF_{name}" for name in fields} | set(ENV_READ_ELSEWHERE)
    warnings = []
    for name in sorted(os.environ if environ is None else environ):
        key = name.upper()
        if key.startswith("CRLF_") and key not in known and not key.startswith("CRLF_TEST_"):
            warnings.append(
                f"ignoring the environment variable {name}: no crlf setting has that name"
                f"{did_you_mean(key.removeprefix('CRLF_'), fields, 'CRLF_{}')}"
            )
            log.warning("%s", warnings[-1])
    return warnings


COMMANDS: list[type[BaseSettings]] = []  # the subcommands' models (crlf.settings fills it)
