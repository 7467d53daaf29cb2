"""Build a JobConfig from defaults, a TOML recipe, the model flavor and ``--section.key value``
overrides, and write it back as TOML.

Precedence, lowest first: dataclass defaults < flavor < recipe < command line. The flavor only
fills keys that neither the recipe nor the command line set, so ``--model.flavor 16B
--model.n_layers 4`` means "16B, but four layers".
"""

import dataclasses
import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any

import tomli

from torchmoe.config import flavor_conflicts
from torchmoe.config.errors import ConfigError
from torchmoe.config.registry import get_model_spec
from torchmoe.config.schema import JobConfig, section_types
from torchmoe.config.validate import validate

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(options)}"


def _field_map(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_types()[section])}


def _check_name(section: str, key: str | None, where: str) -> dataclasses.Field | None:
    sections = section_types()
    if section not in sections:
        raise ConfigError(
            f"{where}: unknown section [{section}]{_did_you_mean(section, list(sections))}"
        )
    if key is None:
        return None
    fmap = _field_map(section)
    if key not in fmap:
        raise ConfigError(f"{where}: unknown key '{section}.{key}'{_did_you_mean(key, list(fmap))}")
    return fmap[key]


def _element_type(f: dataclasses.Field) -> type:
    """The element type of a list field (``list[int]`` -> int)."""
    return (typing.get_args(f.type) or (str,))[0]


def _typed(f: dataclasses.Field, name: str, value: Any, where: str, from_cli: bool) -> Any:
    """Check a TOML value's type, or convert a command-line string, for field ``f``. A list
    field also takes one element (TOML) or comma-separated elements (command line)."""
    kind = type(f.default) if f.default is not dataclasses.MISSING else list
    if kind is list:
        item = _element_type(f)
        if from_cli:
            values = [v.strip() for v in value.split(",") if v.strip()]
        else:
            values = value if isinstance(value, list) else [value]
        bad = ConfigError(
            f"{where}: {name} = {value!r} is not a {item.__name__} or a list of {item.__name__}s"
        )
        if not from_cli and isinstance(value, str) and "," in value:
            raise ConfigError(
                f"{where}: {name} = {value!r}: write several values as a TOML "
                f"list, {name.split('.')[1]} = {value.split(',')!r}"
            )
        return [_scalar(item, v, bad, from_cli) for v in values]
    bad = ConfigError(f"{where}: {name} = {value!r} is not a valid {kind.__name__}")
    return _scalar(kind, value, bad, from_cli)


def _scalar(kind: type, value: Any, bad: ConfigError, from_cli: bool) -> Any:
    if from_cli and kind is not str:
        if kind is bool:
            if value.lower() not in _TRUE | _FALSE:
                raise bad
            return value.lower() in _TRUE
        try:
            return kind(value)
        except ValueError:
            raise bad from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float and number:
        return float(value)
    if kind is int and number and isinstance(value, int):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise bad


_BOUNDS = (
    ("ge", ">=", lambda v, b: v >= b),
    ("gt", ">", lambda v, b: v > b),
    ("le", "<=", lambda v, b: v <= b),
)


def _check_range(f: dataclasses.Field, name: str, value: Any) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    for item in value if isinstance(value, list) else [value]:
        if choices and item not in choices:
            raise ConfigError(
                f"{name} = {value!r} is not allowed; choose "
                f"{'from' if isinstance(value, list) else 'one of'}: "
                f"{', '.join(map(str, choices))}"
            )
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{name} = {value!r} must be a finite number")
        for bound, word, holds in _BOUNDS:
            b = meta.get(bound)
            if b is not None and not holds(item, b):
                raise ConfigError(f"{name} = {value!r} is out of range; it must be {word} {b:g}")


def read_toml(path: str) -> dict:
    """Read a recipe; a missing file or a syntax error is a ConfigError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file; recipes live in train_configs/")
    try:
        return tomli.loads(p.read_text(encoding="utf-8"))
    except tomli.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: malformed TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--config {path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8"
        ) from None


def parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], set[str]]:
    """Split argv into the recipe path, ordered (dotted key, raw value) overrides and flags.

    A bool key given without a value (``--checkpoint.enable``) means true.
    """
    config_path, overrides, flags = None, [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-h":
            flags.add("help")
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --section.key value"
            )
        name, eq, value = arg[2:].partition("=")
        if name in ("print-config", "help"):
            flags.add(name)
            i += 1
            continue
        if name != "config" and "." not in name:
            raise ConfigError(f"--{name}: overrides look like --section.key value")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                f = _check_name(*name.split(".", 1), f"--{name}") if name != "config" else None
                if f is None or not isinstance(f.default, bool):
                    raise ConfigError(f"--{name} needs a value: --{name} VALUE or --{name}=VALUE")
                value = "true"
            else:
                value = nxt
                i += 1
        i += 1
        if name == "config":
            if not value or config_path is not None:
                raise ConfigError("--config takes one recipe file: --config FILE")
            config_path = value
        else:
            overrides.append((name, value))
    return config_path, overrides, flags


def _flavor_values(name: str, flavor: str) -> dict[str, dict[str, Any]]:
    spec = get_model_spec(name)
    if flavor not in spec.flavors:
        raise ConfigError(
            f"model.flavor = {flavor!r} is not a flavor of {name}"
            f"{_did_you_mean(flavor, list(spec.flavors))}"
        )
    return spec.flavors[flavor]


def build_config(toml: dict, overrides: list[tuple[str, str]], where: str = "recipe") -> JobConfig:
    """Layer flavor, recipe and overrides on the defaults, then check every value's range."""
    values: dict[str, dict[str, Any]] = {}
    for section, table in toml.items():
        _check_name(section, None, where)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: '{section}' must be a [{section}] table")
        for key, value in table.items():
            f = _check_name(section, key, where)
            values.setdefault(section, {})[key] = _typed(
                f, f"{section}.{key}", value, where, from_cli=False
            )
    for name, raw in overrides:
        section, _, key = name.partition(".")
        f = _check_name(section, key, f"--{name}")
        values.setdefault(section, {})[key] = _typed(f, name, raw, f"--{name}", from_cli=True)

    cfg = JobConfig()
    model_sec = values.get("model", {})
    flavor = _flavor_values(
        model_sec.get("name", cfg.model.name), model_sec.get("flavor", cfg.model.flavor)
    )
    explicit = {f"{section}.{key}" for section, table in values.items() for key in table}
    for section, table in flavor.items():
        for key, value in table.items():
            values.setdefault(section, {}).setdefault(key, value)
    for section, table in values.items():
        sec = getattr(cfg, section)
        fmap = _field_map(section)
        for key, value in table.items():
            _check_range(fmap[key], f"{section}.{key}", value)
            setattr(sec, key, value)
    from_flavor = {f"{section}.{key}" for section, table in flavor.items() for key in table}
    flavor_conflicts.resolve(cfg, explicit, from_flavor - explicit)
    return cfg


def load_config(argv: list[str]) -> tuple[JobConfig, set[str]]:
    """The full command line -> (validated JobConfig, flags such as 'print-config')."""
    path, overrides, flags = parse_cli(argv)
    toml = read_toml(path) if path else {}
    cfg = build_config(toml, overrides, where=f"--config {path}" if path else "defaults")
    validate(cfg)
    return cfg, flags


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):  # JSON escapes are TOML escapes, except DEL, which TOML forbids
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return str(value)


def to_toml(cfg: JobConfig, with_help: bool = False) -> str:
    """The config as TOML that reads back to an equal JobConfig; ``with_help`` adds each key's
    help text and range as comments (the config reference)."""
    lines = []
    for section in section_types():
        lines.append(f"[{section}]")
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            if with_help:
                meta = f.metadata
                extra = (
                    [f"one of {', '.join(map(str, meta['choices']))}"] if meta["choices"] else []
                )
                extra += [f"{w} {meta[b]:g}" for b, w, _ in _BOUNDS if meta[b] is not None]
                lines.append(f"# {meta['help']}" + (f" ({'; '.join(extra)})" if extra else ""))
            lines.append(f"{f.name} = {_toml_value(getattr(sec, f.name))}")
        lines.append("")
    return "\n".join(lines)
