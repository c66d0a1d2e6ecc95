"""Load a config: YAML files composed with `extends:`, `key=value` overrides, schema validation, cross-field checks.

`extends: <path or list of paths>` names base files relative to the including file; bases are deep-merged in
order, then the including file on top (mappings merge key by key, any other value replaces). Every leaf
remembers which file (or the command line) set it, so each error line names where its key came from.
"""
from __future__ import annotations

import copy
import os
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from replay_megatron.config.checks import check_config
from replay_megatron.config.errors import ConfigError, Problem, did_you_mean, format_problem
from replay_megatron.config.schema import ReplayConfig

COMMAND_LINE = "set on the command line"
_FREE = object()  # a dict-typed field (model.overrides): any key below it is allowed


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-6` as a float (YAML 1.2; PyYAML's YAML 1.1 rules need `1.0e-6`) and refuses
    duplicate keys (PyYAML silently keeps the last one, which would hide half of a section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python objects, the way config files and overrides are read."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                world_size: int | None = None) -> ReplayConfig:
    """Load, compose, override, validate and cross-check the config at `path`; raises ConfigError."""
    data, origin, header = compose(path, overrides)
    try:
        cfg = ReplayConfig.model_validate(data)
    except ValidationError as exc:
        raise _attributed(header, _validation_problems(exc), origin) from None
    problems = check_config(cfg, world_size)
    if problems:
        raise _attributed(header, problems, origin)
    return cfg


def validate_config(cfg: ReplayConfig, world_size: int | None = None) -> None:
    """Re-run the cross-field checks (e.g. once the real world size is known); raises ConfigError."""
    problems = check_config(cfg, world_size)
    if problems:
        raise ConfigError.of(problems)


def compose(path: str | os.PathLike, overrides: Iterable[str] = ()) -> tuple[dict, dict[str, str], str]:
    """(merged raw dict, dotted key -> where it was set, error header) before schema validation."""
    top = Path(path)
    edges: list[tuple[Path, list[Path]]] = []
    data, origin = _compose_file(top.resolve(), (), edges)
    header = f"invalid config {_show(top)}"
    extends = "; ".join(f"{_show(f)} extends {', '.join(_show(p) for p in ps)}" for f, ps in edges if ps)
    if extends:
        header += f" ({extends})"
    for item in overrides:
        _apply_override(data, origin, item, header)
    return data, origin, header


def config_files(path: str | os.PathLike) -> list[Path]:
    """Every file the config at `path` is composed of (itself first, then its bases, depth first), resolved."""
    edges: list[tuple[Path, list[Path]]] = []
    _compose_file(Path(path).resolve(), (), edges)
    return list(dict.fromkeys(f for f, _ in edges))


def _compose_file(path: Path, stack: tuple[Path, ...], edges: list) -> tuple[dict, dict[str, str]]:
    if path in stack:
        cycle = " -> ".join(_show(p) for p in stack[stack.index(path):] + (path,))
        raise ConfigError([f"extends cycle: {cycle}"], f"invalid config {_show(stack[0])}")
    data = _read_yaml(path, stack)
    parents = _extends_of(path, data.pop("extends", None), stack)
    edges.append((path, parents))
    merged: dict = {}
    origin: dict[str, str] = {}
    for parent in parents:
        pdata, porigin = _compose_file(parent, stack + (path,), edges)
        merged, origin = _merge(merged, origin, pdata, porigin)
    return _merge(merged, origin, data, _leaf_origins(data, f"set in {_show(path)}"))


def _read_yaml(path: Path, stack: tuple[Path, ...]) -> dict:
    header = f"invalid config {_show(stack[0] if stack else path)}"
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{_show(path)}: no such config file"], header) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{_show(path)}: not valid YAML{_yaml_where(e)}"], header) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{_show(path)}: the top level must be a mapping of sections, got "
                           f"{type(data).__name__}"], header)
    return data


def _yaml_where(e: yaml.YAMLError) -> str:
    """` at line L, column C: problem` of a YAML error (its own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(e, 'problem', None) or e}"


def _extends_of(path: Path, value: Any, stack: tuple[Path, ...]) -> list[Path]:
    header = f"invalid config {_show(stack[0] if stack else path)}"
    names = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError([f"{_show(path)}: extends = {value!r}: must be a path or a list of paths"], header)
    parents = [(path.parent / n).resolve() for n in names]
    for name, parent in zip(names, parents):
        if not parent.is_file():
            raise ConfigError([f"{_show(path)}: extends {name!r}: no such file {_show(parent)}"], header)
    return parents


def _merge(base: dict, base_origin: dict[str, str], child: dict,
           child_origin: dict[str, str]) -> tuple[dict, dict[str, str]]:
    merged = _deep_merge(base, child)
    kept = {k: v for k, v in base_origin.items() if _has_path(merged, k) and k not in child_origin}
    return merged, {**kept, **child_origin}


def _deep_merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaf_origins(data: dict, where: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_leaf_origins(value, where, dotted + "."))
        else:
            out[dotted] = where
    return out


def _has_path(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _apply_override(data: dict, origin: dict[str, str], item: str, header: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {item!r}: expected key=value (e.g. optimizer.lr=2e-6)"], header)
    parts = key.split(".")
    bad = _unknown_key(parts)
    if bad:
        raise ConfigError([f"override {item!r}: {bad}"], header)
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError([f"override {item!r}: value is not valid YAML{_yaml_where(e)}"], header) from None
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    for k in [k for k in origin if k == key or k.startswith(key + ".")]:
        del origin[k]
    origin[key] = COMMAND_LINE


def _unknown_key(parts: Sequence[str]) -> str | None:
    """Why dotted `parts` is not a key of the schema, listing the valid keys at that level; None if it is."""
    node: Any = ReplayConfig
    for i, part in enumerate(parts):
        if node is _FREE:
            return None
        if node is None:
            return f"{'.'.join(parts[:i])} is a value, not a section"
        fields = node.model_fields
        if part not in fields:
            level = ".".join(parts[:i]) or "the top level"
            return (f"unknown key {part!r} in {level}{did_you_mean(part, fields)}; valid keys: "
                    f"{', '.join(fields)}")
        node = _nested(fields[part].annotation)
    return None


def _nested(annotation: Any) -> Any:
    """The section model under a field annotation, _FREE for a dict, None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return _FREE
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def _validation_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        parts, model = _clean_loc(err)
        key = ".".join(parts) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = list(model.model_fields) if isinstance(model, type) else []
            msg = f"unknown key{did_you_mean(parts[-1].split('[')[0], valid)}; valid keys: {', '.join(valid)}"
            problems.append(Problem(key, msg, has_value=False))
        elif err["type"] == "missing":
            problems.append(Problem(key, "required key is missing", has_value=False))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            problems.append(Problem(key, msg, value, has_value=not isinstance(value, dict)))
    return problems


def _clean_loc(err: dict) -> tuple[list[str], Any]:
    """Dotted parts of a pydantic error location (union tags dropped, indices as [i]) and the model at the end."""
    parts: list[str] = []
    model: Any = ReplayConfig
    parent: Any = ReplayConfig
    for item in err["loc"]:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        elif model is _FREE:
            parts.append(str(item))
        elif isinstance(model, type) and item in model.model_fields:
            parts.append(item)
            parent, model = model, _nested(model.model_fields[item].annotation)
        elif err["type"] == "extra_forbidden" and isinstance(model, type):
            parts.append(str(item))
            parent = model
    return parts, parent


def _attributed(header: str, problems: list[Problem], origin: dict[str, str]) -> ConfigError:
    return ConfigError([format_problem(p, _origin_of(p.key, origin)) for p in problems], header, causes=problems)


def _origin_of(key: str, origin: dict[str, str]) -> str:
    """Where dotted `key` (or the keys under it, or its nearest set ancestor) was set; 'default' otherwise."""
    base = key.split("[")[0]
    if base in origin:
        return origin[base]
    under = sorted({v for k, v in origin.items() if k.startswith(base + ".")})
    if under:
        return "; ".join(under)
    parts = base.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in origin:
            return origin[".".join(parts[:i])]
    return "default"


def _show(path: Path) -> str:
    """`path` relative to the working directory when below it (shorter messages), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
