"""The house rules of docs/architecture.md, checked on the source: no import cycles between modules
of ``peer/`` (type-only imports included: they hide a back-reference all the same), no module over
450 lines and no class over 300 unless the architecture page names it with a reason, and ruff's
complexity check at 15."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of peer/ and protocol/ (a package by its __init__)."""
    out = {}
    for top in ("peer", "protocol"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "messages_pb2.py":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports, wherever the statement
    stands (inside functions and ``if TYPE_CHECKING:`` blocks too)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:  # a name imported from a module counts as the module
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def named_with_a_reason() -> set[str]:
    """What the architecture page allows to be larger: the backticked names in the bullets of its
    "Larger, on purpose" list, each of which must give a reason after a colon."""
    text = ARCHITECTURE.read_text()
    section = text.split("Larger, on purpose", 1)[1].split("\n\n## ", 1)[0]
    section = section[section.index("\n- ") + 1 :]
    names = set()
    for bullet in re.findall(r"^- (.+?)(?=^- |\Z)", section, flags=re.S | re.M):
        head, _, reason = bullet.partition(":")
        assert reason.strip(), f"docs/architecture.md names {head.strip()} without a reason"
        names.update(re.findall(r"`([^`]+)`", head))
    return names


def test_no_import_cycles_between_modules_of_peer():
    known = modules()
    graph = {name: imported(path, name, known) for name, path in known.items() if name.startswith("peer")}
    graph = {name: {t for t in targets if t.startswith("peer")} for name, targets in graph.items()}
    # A package's __init__ hands its modules' names on: an import of a package through a module of
    # its own is the package importing itself, not a back-reference.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert cycles(graph) == []


def test_the_cycle_finder_sees_type_only_imports(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from peer.b import B\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from peer.a import A\n")
    known = {"peer.a": a, "peer.b": b}
    graph = {n: imported(p, n, known) for n, p in known.items()}
    assert cycles(graph) == [["peer.a", "peer.b"]]


def test_no_module_or_class_over_its_size_unless_named_with_a_reason():
    allowed = named_with_a_reason()
    over = []
    for name, path in modules().items():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and rel not in allowed:
            over.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES and node.name not in allowed:
                    over.append(f"{rel}: class {node.name} is {size} lines (at most {MAX_CLASS_LINES})")
    assert not over, "\n".join(over) + "\n(or name it in docs/architecture.md with a reason)"


def test_ruff_complexity_is_at_most_15():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "concise", "peer", "protocol"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max-complexity = 15" in (ROOT / "pyproject.toml").read_text()  # what ruff checks against
