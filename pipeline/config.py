"""Recipes: YAML files plus ``key=value`` overrides, turned into typed dataclasses.

A recipe is one YAML file with top-level sections (``model``, ``data``, ``train`` ...). Each stage
declares the dataclasses it reads and calls :func:`build` on its sections; unknown keys are errors
that name the closest valid key, values are checked against the field types, and every error names
the YAML file and the dotted key.

    raw = load_recipe_dict("recipes/tiny/sft.yaml", ["train.lr=1e-4", "data.sources.0.fraction=0.5"])
    recipe = build(SFTRecipe, raw, source="recipes/tiny/sft.yaml")
    save_recipe(recipe, out_dir / "recipe.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe (or an override) is wrong; the message says where and what to do."""


# ----------------------------------------------------------------------------------------------
# Loading and overrides
# ----------------------------------------------------------------------------------------------


def read_yaml_mapping(path: str | os.PathLike, what: str, error: type[Exception] = RecipeError) -> dict:
    """The mapping a YAML file holds ({} for an empty file). Anything else raises `error`, naming
    the file (and the line of a syntax error); `what` says what the file is ("recipe")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise error(f"{where}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise error(f"{path}: this {what} must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def load_recipe_dict(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> dict:
    """Read a YAML recipe and apply ``key=value`` overrides (dot paths, list indices)."""
    raw = read_yaml_mapping(path, "recipe")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``a.b.0.c=value`` override in place; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-5)")
    value = yaml.safe_load(text) if text.strip() else ""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not re.fullmatch(r"-?\d+", part):
                raise RecipeError(f"override {key}: {where} indexes a list, expected an integer index")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise RecipeError(f"override {key}: index {idx} out of range (list has {len(node)} items)")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"override {key}: {'.'.join(parts[:depth])} is a value, not a section")


# ----------------------------------------------------------------------------------------------
# Building dataclasses
# ----------------------------------------------------------------------------------------------


def build(cls: type[T], data: Any, *, source: str = "recipe", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively, with checked types.

    Errors name ``source`` (the YAML file) and the dotted key; an unknown key suggests the closest
    valid one. ``ValueError``s raised by ``__post_init__`` are re-raised with the same location.
    """
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise RecipeError(_unknown_key_message(source, prefix, str(key), list(fields)))
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key {dotted}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{source}: {where}: {err}") from err


def _unknown_key_message(source: str, prefix: str, key: str, valid: list[str]) -> str:
    dotted = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    return f"{source}: unknown key '{dotted}'{hint} (valid keys here: {', '.join(sorted(valid))})"


def _coerce(tp: Any, value: Any, source: str, dotted: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, dotted)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{source}: {dotted}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise RecipeError(f"{source}: {dotted} must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, prefix=dotted)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: {dotted} must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, source, f"{dotted}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {dotted} must be a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {k: _coerce(val_tp, v, source, f"{dotted}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{source}: {dotted} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{source}: {dotted} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise RecipeError(f"{source}: {dotted} must be a number, got {value!r}")
        # No recipe number means anything as nan or inf, and nan passes every `x <= 0` check.
        if not math.isfinite(number):
            raise RecipeError(f"{source}: {dotted} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{source}: {dotted} must be a string, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

# Keys whose values never reach a saved recipe or a tracker config: a word of the name is one of
# these ("hf_token", "wandb_api_key", "auth_header"), not just a substring of it ("tokenizer",
# "max_new_tokens" and "text_tokens" are settings to keep).
_SECRET_WORDS = ("token", "secret", "password", "passwd", "credential", "credentials")
_API_KEY = re.compile(r"api[_-]?key", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a recipe key or an environment variable name looks like it holds a secret."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(_API_KEY.search(name)) or any(w in _SECRET_WORDS or w.startswith("auth") for w in words)


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) from dataclasses, with secret-looking keys redacted."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: ("<redacted>" if is_secret_name(str(k)) and v else to_dict(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def redact_env_secrets(text: str) -> str:
    """Remove the values of secret environment variables (W&B, HF tokens ...) from ``text``."""
    for name, value in os.environ.items():
        if value and len(value) >= 8 and is_secret_name(name):
            text = text.replace(value, "<redacted>")
    return text


def save_recipe(recipe: Any, path: str | os.PathLike) -> None:
    """Write the resolved recipe as YAML (atomically), secrets redacted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = redact_env_secrets(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_cli(argv: typing.Sequence[str] | None = None, usage: str = "") -> tuple[str, list[str]]:
    """``RECIPE [key=value ...]`` -> (recipe path, overrides). Exits with usage on a bad call."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(usage or "usage: python -m pipeline.<stage> RECIPE.yaml [key=value ...]", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    for item in argv[1:]:
        if "=" not in item:
            print(f"error: argument {item!r} is not key=value (e.g. train.lr=1e-5)", file=sys.stderr)
            raise SystemExit(2)
    return argv[0], argv[1:]
