"""A manifest's text to data: YAML whose aliases cannot expand without bound, `--set KEY=VALUE`
overrides, the {run_date} and {run_id} placeholders of its paths, and values quoted in error
messages at a bounded length."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from workers.errors import ManifestError

QUOTE_CHARS = 200  # an error message quotes at most this much of any value
MAX_NODES = 100_000  # YAML nodes a manifest (or a --set value) may expand to, aliases followed


def quote(value: Any) -> str:
    """A value as an error message shows it: its repr, cut to QUOTE_CHARS, however big the value
    (reprlib stops early, so a huge or deeply shared structure is never expanded whole)."""
    import reprlib

    shown = reprlib.Repr()  # attributes, not arguments: Python 3.11's takes none
    shown.maxlevel, shown.maxlist, shown.maxdict, shown.maxtuple, shown.maxset = 3, 8, 8, 8, 8
    shown.maxstring = shown.maxother = shown.maxlong = QUOTE_CHARS
    text = shown.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def cut(text: str) -> str:
    """A message of ours or a library's, cut to a few lines' worth: it may quote a value whole."""
    return text if len(text) <= 4 * QUOTE_CHARS else text[: 4 * QUOTE_CHARS] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document expanding to more than MAX_NODES nodes: aliases
    share one node, so a few hundred bytes can stand for billions of values (a "billion laughs")."""

    def construct_document(self, node):
        sizes: dict[int, int] = {}

        def size(n) -> int:  # nodes under n with aliases followed, each shared node counted once per use
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = 1  # a recursive alias counts once
            if isinstance(n, yaml.SequenceNode):
                total = 1 + sum(size(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in n.value)
            else:
                total = 1
            sizes[id(n)] = min(total, MAX_NODES + 1)
            return sizes[id(n)]

        if size(node) > MAX_NODES:
            raise yaml.YAMLError(
                f"expands to more than {MAX_NODES:,} values once its aliases (*name) are followed; expected a "
                f"manifest of ordinary size"
            )
        return super().construct_document(node)


def safe_load(text: str) -> Any:
    """yaml.safe_load with the expansion bound of _BoundedLoader."""
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def apply_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ManifestError(f"--set {quote(assignment)}: expected KEY=VALUE, e.g. --set stage1.batch_size=8")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ManifestError(f"--set {quote(assignment)}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ManifestError(f"--set {quote(assignment)}: the value is not valid YAML: {cut(str(err))}") from None


# Placeholders that input.path and output.path may hold, so that a scheduled job writes each
# night to its own output and a re-run of the same night resumes it.
PATH_FIELDS = ("input", "output")


def template_values(run_date: str | None = None, run_id: str | None = None) -> dict[str, str]:
    """{run_date} (YYYY-MM-DD, default today in UTC) and {run_id} (only when given)."""
    import datetime as dt

    run_date = run_date or os.environ.get("IFRENDER_RUN_DATE") or dt.datetime.now(dt.UTC).date().isoformat()
    try:
        dt.date.fromisoformat(run_date)
    except ValueError:
        raise ManifestError(f"--run-date {run_date!r}: expected a date as YYYY-MM-DD, e.g. 2026-11-22") from None
    values = {"run_date": run_date}
    run_id = run_id or os.environ.get("IFRENDER_RUN_ID")
    if run_id:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", run_id):
            raise ManifestError(f"--run-id {run_id!r}: expected letters, digits, '.', '_' or '-' only")
        values["run_id"] = run_id
    return values


def fill_paths(source: str, data: dict[str, Any], values: dict[str, str]) -> None:
    for section in PATH_FIELDS:
        node = data.get(section)
        if not isinstance(node, dict) or not isinstance(node.get("path"), str):
            continue
        for name in re.findall(r"\{([^{}]*)\}", node["path"]):
            if name not in values:
                hint = "pass --run-id ID (or set IFRENDER_RUN_ID)" if name == "run_id" else "use {run_date} or {run_id}"
                raise ManifestError(
                    f"{source}: {section}.path {quote(node['path'])} holds the placeholder {{{name}}} but no value "
                    f"for it; expected one of {sorted(values)}. Fix: {hint}."
                )
        node["path"] = re.sub(r"\{([^{}]*)\}", lambda m: values[m.group(1)], node["path"])
