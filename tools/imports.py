"""The package's modules and their imports of each other, and any import cycle.

    python tools/imports.py [PACKAGE_DIR] [--edges]

Reads the source (nothing is imported): every ``import``/``from ... import`` of a module of
the package, at any depth (imports inside functions count: they are still dependencies).
Prints the module count, the edge count, each cycle found (strongly connected components
of more than one module) and, with --edges, every module with what it imports.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    pkg = root.name
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    assert all(m == pkg or m.startswith(pkg + ".") for m in out)
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "opensubject_tasks"))
    ap.add_argument("--edges", action="store_true")
    args = ap.parse_args()
    mods = modules(Path(args.package))
    # a package's __init__ importing its submodules is no dependency of theirs on it
    graph = {m: {t for t in imports(m, p, set(mods)) if not t.startswith(m + ".")} for m, p in mods.items()}
    found = cycles(graph)
    print(f"{len(mods)} modules, {sum(map(len, graph.values()))} imports between them, {len(found)} cycle(s)")
    for c in found:
        print("cycle:", " <-> ".join(c))
    if args.edges:
        for m in sorted(graph):
            print(f"{m}: {', '.join(sorted(graph[m])) or '-'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
