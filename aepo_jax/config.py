"""Typed configs as plain data: nested dataclasses, YAML files and ``--key=value`` overrides.

A run's configuration is one tree of dataclasses (see :mod:`aepo_jax.train` for the trainer's).
It is built once at start-up, in this order, later sources winning:

1. the dataclass defaults,
2. a YAML file (``--config configs/X.yaml``),
3. command-line overrides ``--section.key=value`` (or ``--section.key value``),

and validated once. Unknown keys are errors that name the nearest valid key; values are coerced
to the annotated type (``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``dict``, ``X | None``)
with errors that name the key and the value. The trainer's command line is parsed here only; before
that, ``aepo_jax.platform.mesh_spec_from_argv`` may peek at ``--mesh`` (device flags must be set
before jax starts), and the rollout server and the tools parse their own arguments (argparse).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key (and file, if any)."""


# --------------------------------------------------------------------------- introspection


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flat_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass tree, e.g. ``["train.steps", "model.path", ...]``."""
    out = []
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if _is_dataclass_type(tp):
            out.extend(flat_keys(tp, key + "."))
        else:
            out.append(key)
    return out


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # try matching the last component only (``--lr`` -> ``optim.lr``)
        tails = {k.rsplit(".", 1)[-1]: k for k in valid}
        m = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        near = [tails[m[0]]] if m else []
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"{where}unknown config key '{key}'{hint}")


# --------------------------------------------------------------------------- coercion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': cannot use {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"config key '{key}': not a mapping: {value!r} ({e})") from e
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


# --------------------------------------------------------------------------- building


def _parse_cli_value(raw: str) -> Any:
    """Keep CLI strings as strings; types are decided by the field annotation."""
    return raw


def _set_nested(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict | None, *, where: str = "", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, validating keys and coercing types."""
    data = dict(data or {})
    types_ = _field_types(cls)
    valid = flat_keys(cls, prefix)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            # Name the whole dotted key the user wrote (``a.contrller.target``, not ``a.contrller``).
            while isinstance(value, dict) and len(value) == 1:
                (sub, value), = value.items()
                full = f"{full}.{sub}"
            raise _unknown_key_error(full, valid + [k.rsplit(".", 1)[0] for k in valid], where)
        tp = types_[key]
        if _is_dataclass_type(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}config key '{full}' is a section; got {value!r}")
            kwargs[key] = from_dict(tp, value, where=where, prefix=full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}{prefix or 'config'}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a dataclass tree (what is written to RUN_DIR/config.yaml)."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    p = Path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"config file {p}: include cycle through {[str(x) for x in _seen]}")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping, got {type(data).__name__}")
    # ``include: base.yaml`` (or a list) pulls in other files, relative to this one; this file wins.
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml(p.parent / inc, _seen=(_seen or ()) + (p.resolve(),)))
    return deep_merge(merged, data)


def parse_overrides(argv: list[str], *, aliases: dict[str, str] | None = None) -> tuple[str | None, dict]:
    """Split argv into (config file path, nested overrides dict).

    Accepts ``--key=value``, ``--key value`` and bare ``--flag`` (meaning ``true``). Dashes inside key
    names are read as underscores (``--run-dir`` == ``--run_dir``); ``aliases`` maps short keys such
    as ``mesh`` to their dotted place (``train.mesh``).
    """
    aliases = aliases or {}
    config_path = None
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 1
        else:
            key, value = body, "true"
        key = key.replace("-", "_")
        i += 1
        if key == "config":
            config_path = value
            continue
        key = aliases.get(key, key)
        _set_nested(overrides, key, _parse_cli_value(value))
    return config_path, overrides


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(cls: type[T], argv: list[str], *, aliases: dict[str, str] | None = None) -> T:
    """Defaults <- YAML (``--config``) <- ``--key=value`` overrides, validated once."""
    config_path, overrides = parse_overrides(argv, aliases=aliases)
    data: dict = {}
    where = ""
    if config_path:
        data = load_yaml(config_path)
        where = f"{config_path}: "
    cfg_from_file = from_dict(cls, data, where=where)  # validates the file on its own first
    merged = deep_merge(to_dict(cfg_from_file), overrides)
    return from_dict(cls, merged, where="command line: " if overrides else where)


def help_text(cls: type, defaults: Any | None = None, *, prog: str = "") -> str:
    """Every option with its type and default, one per line (for ``--help``)."""
    defaults = defaults if defaults is not None else cls()
    lines = [f"usage: {prog} [--config FILE.yaml] [--section.key=value ...]", "", "options (default in brackets):"]

    def walk(c: type, d: Any, prefix: str) -> None:
        for f in dataclasses.fields(c):
            tp = _field_types(c)[f.name]
            val = getattr(d, f.name)
            if _is_dataclass_type(tp):
                doc = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ else ""
                lines.append(f"\n  [{prefix}{f.name}] {doc}")
                walk(tp, val, f"{prefix}{f.name}.")
            else:
                tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
                comment = f.metadata.get("help", "") if f.metadata else ""
                lines.append(f"  --{prefix}{f.name}={val!r}  ({tname}){'  ' + comment if comment else ''}")

    walk(cls, defaults, "")
    return "\n".join(lines)
