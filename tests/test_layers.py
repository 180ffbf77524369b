"""The tree's layers. workers/ (what runs in actors) never imports jobs/ (the driver). Within jobs/
the folders follow the data flow, each importing only what lies below it:

    cli, bench, weights           commands (top floor)
    render                        the recipe
    run/                          a run: preflight, cluster and pools, chain, chunks, watch, assembly
    input/  output/  plan/        data in, data out, the planner: never the run
    manifest                      the settings every layer reads

Nothing in the installed package imports tests/ or benchmarks/; jobs/render.py defines one
public function; no module of jobs/ or workers/ is over 400 lines; no two modules import each
other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "workers")
MAX_LINES = 400

# What each part of the package may import from jobs/ (workers/ is open to every part of jobs/).
ALLOWED = {
    "jobs.manifest_yaml": set(),
    "jobs.manifest_io": set(),
    "jobs.manifest_help": set(),
    "jobs.machine_load": set(),  # the bench's load monitor: the machine, nothing of ifrender's
    "jobs.manifest": {"jobs.manifest_yaml", "jobs.manifest_io", "jobs.manifest_help"},
    "jobs.input": {"jobs.manifest", "jobs.input"},
    "jobs.plan": {"jobs.manifest", "jobs.plan"},
    "jobs.output": {"jobs.manifest", "jobs.input", "jobs.output"},
    "jobs.run": {"jobs.manifest", "jobs.input", "jobs.output", "jobs.plan", "jobs.run"},
    "jobs.render": {"jobs.manifest", "jobs.input", "jobs.output", "jobs.plan", "jobs.run"},
}
TOP_FLOOR = ("jobs.cli", "jobs.bench", "jobs.weights")  # may import anything in the package


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(tree: ast.AST) -> set[str]:
    """Every module name an import in `tree` names, anywhere in its body (imports inside functions
    count: they run too), except under `if TYPE_CHECKING:` (annotations only: never run)."""
    found: set[str] = set()
    skip = {id(n) for node in ast.walk(tree) if _type_checking(node) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(modules: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Every module of jobs/ and workers/ (or of `modules`: name -> source) -> the project modules
    it imports."""
    if modules is None:
        modules = {name: path.read_text() for name, path in sources().items()}
    graph: dict[str, set[str]] = {}
    for name, text in modules.items():
        targets = imported(ast.parse(text))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def part(module: str) -> str:
    """The layer a module of jobs/ belongs to: its folder, or the module at the top."""
    parts = module.split(".")
    return ".".join(parts[:2])


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if module.startswith("workers") and dep.startswith("jobs"):
                found.append(f"{module} imports {dep}: workers/ must not import jobs/")
            elif module.startswith("jobs") and dep.startswith("jobs") and part(module) not in TOP_FLOOR:
                allowed = ALLOWED.get(part(module))
                if allowed is None:
                    found.append(f"{module}: a module of jobs/ in no layer (add it to ALLOWED or TOP_FLOOR)")
                elif part(dep) not in allowed:
                    found.append(f"{module} imports {dep}: {part(module)} may import only {sorted(allowed)}")
    return found


def outside_imports() -> list[str]:
    """Imports of tests/ or benchmarks/ from the installed package."""
    return [
        f"{name} imports {t}"
        for name, path in sources().items()
        for t in sorted(imported(ast.parse(path.read_text())))
        if t.split(".")[0] in ("tests", "benchmarks")
    ]


def test_every_import_follows_the_layers():
    assert not violations(imports())


def test_a_planted_upward_import_is_found():
    modules = {name: path.read_text() for name, path in sources().items()}
    modules["jobs.output.commits"] += "\nfrom jobs.run.state import Run\n"
    modules["jobs.plan.search"] += "\ndef f():\n    import jobs.render\n"
    modules["workers.base"] += "\nfrom jobs.manifest import Manifest\n"
    found = violations(imports(modules))
    assert any(v.startswith("jobs.output.commits imports jobs.run.state") for v in found), found
    assert any(v.startswith("jobs.plan.search imports jobs.render") for v in found), found
    assert any(v.startswith("workers.base imports jobs.manifest") for v in found), found
    # Under `if TYPE_CHECKING:` an import never runs.
    modules = {name: path.read_text() for name, path in sources().items()}
    modules["jobs.input.rows"] += (
        "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jobs.run.state import Run\n"
    )
    assert not violations(imports(modules))


def test_the_package_never_imports_tests_or_benchmarks():
    assert not outside_imports()


def test_render_defines_one_public_function():
    tree = ast.parse((ROOT / "jobs" / "render.py").read_text())
    public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and not n.name.startswith("_")]
    assert public == ["run"]
    assert len((ROOT / "jobs" / "render.py").read_text().splitlines()) <= 150


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_the_line_limit(package):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(imports())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle_through_a_third_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
