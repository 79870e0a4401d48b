"""The import layers of docs/architecture.md: every import points down (or within a package).

Read statically from the source (every ``import``/``from`` statement, also inside functions).
The check in a fresh interpreter that a running peer never loads ``peer.dev`` is
tests/integration/test_layers_runtime.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# docs/architecture.md's order, lowest first: a package may import its own layer and those below.
LAYERS = [
    {"protocol"},
    {"peer", "peer.base"},
    {"peer.net"},
    {"peer.model", "peer.data"},
    {"peer.pipeline", "peer.averaging", "peer.swarm", "peer.checkpoints", "peer.teach"},
    {"peer.observe"},
    {"peer.node"},
    {"peer.cli"},
]
# Developer tools sit beside the peer, not under it: they may import anything but the CLI,
# and only the CLI may import them (its demo command, lazily).
DEV = "peer.dev"


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "protocol":
        return "protocol"
    if parts[0] != "peer":
        return ""
    return f"peer.{parts[1]}" if len(parts) > 1 and not parts[1].startswith("__") else "peer"


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"{package} is in no layer of docs/architecture.md")


def imports(path: Path) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if name in ("peer", "protocol")]
    return out


def sources():
    for top in ("peer", "protocol"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name != "messages_pb2.py":
                yield path


def test_imports_point_down():
    wrong = []
    for path in sources():
        here = package_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, name in imports(path):
            there = package_of(name)
            if not there or there == here:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if here == "protocol":
                wrong.append(f"{where} (protocol never imports peer)")
            elif there == DEV:
                if here != "peer.cli":
                    wrong.append(f"{where} (only the CLI may import {DEV})")
            elif here == DEV:
                if there == "peer.cli":
                    wrong.append(f"{where} ({DEV} may not import the CLI)")
            elif layer_of(there) > layer_of(here):
                wrong.append(f"{where} ({there} is above {here})")
    assert not wrong, "\n".join(wrong)


def test_every_package_is_in_a_layer():
    packages = {package_of(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in sources()}
    for package in packages - {DEV}:
        layer_of(package)
