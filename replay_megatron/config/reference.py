"""The field reference of the config schema as markdown (configs/README.md embeds it; a test keeps it current).

Run `python -m replay_megatron.config.reference` to print it.
"""
from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from replay_megatron.config.schema import ReplayConfig


def schema_reference(model: type[BaseModel] = ReplayConfig, prefix: str = "") -> str:
    """One markdown table row per leaf field: dotted key, type, default, description."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"] if not prefix else []
    for name, field in model.model_fields.items():
        nested = _section(field.annotation)
        if nested is not None:
            if field.default is None:
                rows.append(f"| `{prefix}{name}` | section or null | `None` | {field.description} (off when null) |")
            rows.append(schema_reference(nested, f"{prefix}{name}."))
            continue
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | "
                    f"{field.description or ''} |")
    return "\n".join(rows)


def _section(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return (text or str(annotation).replace("typing.", "")).replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else f"`{field.default_factory()!r}`"
    return f"`{field.default!r}`"


if __name__ == "__main__":
    print(schema_reference())
