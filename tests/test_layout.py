"""The package's import graph, read from its sources (function-level imports included): no cycle
and none of the arrows design.md's "Seams" section rules out (issue 18)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "circuits"

#: (importer, imported): a module under the first may never import one under the second.
FORBIDDEN = [
    (("model",), ("store", "trainer", "engine", "analysis", "run")),
    (("measures",), ("trainer", "analysis", "dashboard", "store", "engine", "run", "report")),
    (("trainer",), ("measures", "analysis", "dashboard", "plots", "report")),
    (("engine",), ("trainer", "analysis", "experiments", "dashboard", "run", "report")),
    (("analysis",), ("dashboard", "plots", "report", "cli", "cli_common", "cli_experiments")),
    (("experiments",), ("dashboard", "report")),
    (("dashboard",), ("engine", "trainer")),
]
CLI = ("cli", "cli_common", "cli_experiments")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        if "_vendor" in f.parts:
            continue
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(arrows, external)``: each module's imports of the package's modules (resolved to the
    deepest module that exists) and its top-level imports of other packages."""
    mods = _modules()
    arrows: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    head = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    head = node.module or ""
                targets = [head] + [f"{head}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] != "circuits":
                    external[mod].add(t.split(".")[0])
                    continue
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # A package importing its own parent, or its __init__ re-exporting a child,
                # is not an arrow of the design.
                if t and t != mod and not mod.startswith(t + ".") and not t.startswith(mod + "."):
                    arrows[mod].add(t)
    return arrows, external


def _under(mod: str, names: tuple[str, ...]) -> bool:
    return any(mod == f"circuits.{n}" or mod.startswith(f"circuits.{n}.") for n in names)


def _cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in arrows[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in arrows:
        if v not in index:
            visit(v)
    return found


def forbidden_arrows(arrows: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in arrows.items():
        if not _under(mod, CLI) and external[mod] & {"typer", "rich", "click"}:
            bad.append(f"{mod} imports {sorted(external[mod] & {'typer', 'rich', 'click'})}")
        for t in targets:
            if not _under(mod, CLI) and _under(t, CLI):
                bad.append(f"{mod} -> {t}")
            for src, dst in FORBIDDEN:
                if _under(mod, src) and _under(t, dst):
                    bad.append(f"{mod} -> {t}")
    return sorted(bad)


def test_the_package_has_no_import_cycle() -> None:
    arrows, _ = import_graph()
    assert len(arrows) > 40  # the whole package was read
    assert _cycles(arrows) == []


def test_no_arrow_that_design_md_rules_out() -> None:
    arrows, external = import_graph()
    assert forbidden_arrows(arrows, external) == []


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from circuits.dashboard import write_run_dashboard\n", "circuits.analysis -> circuits.dashboard"),
    ("import typer\n", "circuits.analysis imports ['typer']"),
])
def test_the_checker_sees_function_level_imports(tmp_path: Path, source: str, expected: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker itself, on a copy of the package with one bad import added to analysis.
    import shutil

    copy = tmp_path / "circuits"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("_vendor", "__pycache__"))
    (copy / "analysis.py").write_text((copy / "analysis.py").read_text() + "\n\n" + source)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", copy)
    arrows, external = import_graph()
    assert expected in forbidden_arrows(arrows, external)
    if "dashboard" in source:  # and a cycle through function-level imports on both sides
        init = copy / "dashboard" / "__init__.py"
        init.write_text(init.read_text() + "\n\ndef g():\n    import circuits.analysis\n")
        arrows, _ = import_graph()
        assert any("circuits.analysis" in c and "circuits.dashboard" in c for c in _cycles(arrows))


def test_the_distribution_name_is_not_the_unrelated_circuits_package() -> None:
    # Issue 21, item 7: `circuits` on the package index is an event framework; ours is
    # installed as grokking-circuits and imported as circuits.
    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "grokking-circuits"
    assert "circuits" in project["scripts"] and project["scripts"]["circuits"].startswith("circuits.")
    assert "pip install grokking-circuits" in (root / "README.md").read_text()
