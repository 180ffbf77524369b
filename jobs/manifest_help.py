"""What the manifest's typed models say about their fields, for people: the nearest valid names
for an unknown key, and `ifrender validate --explain FIELD` (a field's description, type,
default and bounds). Read from the pydantic models themselves, so the help never drifts from
what is checked."""

from __future__ import annotations

import difflib
import types
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from workers.errors import ManifestError


def _model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (through `X | None`), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found:
                return found
    return None


def section(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The model at a dotted location of the manifest (a tuple of keys), None past a plain value."""
    model: type[BaseModel] | None = root
    for key in path:
        info = model.model_fields.get(str(key)) if model else None
        model = _model_of(info.annotation) if info else None
    return model


def nearest(root: type[BaseModel], path: tuple, name: str) -> list[str]:
    """Valid names at `path` that are spelled like `name` (closest first)."""
    model = section(root, path)
    if model is None:
        return []
    names = list(model.model_fields)
    words = set(name.lower().split("_"))
    within = [n for n in names if words <= set(n.split("_"))]  # num_steps: num_inference_steps
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    return list(dict.fromkeys(within + close))[:3]


def explain(root: type[BaseModel], dotted: str) -> str:
    """A field's (or section's) description, type, default and bounds."""
    *parents, last = dotted.split(".")
    model = section(root, tuple(parents))
    info: FieldInfo | None = model.model_fields.get(last) if model else None
    if info is None:
        where = ".".join(parents) or "the top level"
        valid = sorted(model.model_fields) if model else []
        close = nearest(root, tuple(parents), last)
        hint = f" Did you mean {', '.join('.'.join([*parents, c]) for c in close)}?" if close else ""
        raise ManifestError(
            f"--explain {dotted}: no such field at {where}.{hint} Fields there: {', '.join(valid) or 'none'}"
        )
    lines = [f"{dotted}: {info.description or '(no description)'}"]
    sub = _model_of(info.annotation)
    lines.append(f"  type: {sub.__name__ if sub else _type_name(info.annotation)}")
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        lines.append(f"  default: {default.model_dump(mode='json') if isinstance(default, BaseModel) else default!r}")
    else:
        lines.append("  required")
    bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata for attr, op in _BOUNDS if hasattr(m, attr)]
    if bounds:
        lines.append(f"  bounds: {', '.join(bounds)}")
    if sub:
        lines.append(f"  fields: {', '.join(sub.model_fields)} (ifrender validate --explain {dotted}.FIELD)")
    return "\n".join(lines)


_BOUNDS = (
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("min_length", "length >="),
    ("max_length", "length <="),
)


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "")
