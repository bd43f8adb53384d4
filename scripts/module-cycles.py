#!/usr/bin/env python3
"""Fails when the modules of a crate depend on each other in a cycle (`make lint`).

A module is a source file of the crate's library (`src/store/postgres.rs` is
`store::postgres`, a `mod.rs` is its directory's module; `main.rs` and `src/bin/` are
left out). Module A depends on module B when A's non-test code names a
path under `crate::B` (in a `use` or inline) or reaches B through `super::`. A module and
its own ancestors or descendants may name each other freely (a parent declares its
children, a child uses its parent's items): only other pairs count. A cycle means two
modules cannot be understood, tested or moved apart; break it by moving the name that
holds it to where both can depend on it one way.

Usage: scripts/module-cycles.py CRATE_DIR...   (each a directory holding src/)
"""

import re
import sys
from pathlib import Path

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def without_tests(text: str) -> str:
    """The file up to its `#[cfg(test)] mod tests` block (kept at the end by convention)."""
    match = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub\s+)?mod\s+\w+\s*\{", text, re.M)
    return text[: match.start()] if match else text


def without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def use_tree_paths(text: str, start: int) -> list[list[str]]:
    """The paths of the use tree (or plain path) starting at text[start:]."""
    paths: list[list[str]] = []

    def tree(i: int, prefix: list[str]) -> int:
        path = list(prefix)
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if text.startswith("{", i):
                i += 1
                while True:
                    i = tree(i, path)
                    while i < len(text) and text[i].isspace():
                        i += 1
                    if text.startswith(",", i):
                        i += 1
                        continue
                    if text.startswith("}", i):
                        return i + 1
                    return i
            match = IDENT.match(text, i)
            if not match:
                if path != prefix:
                    paths.append(path)
                return i
            path = path + [match.group()]
            i = match.end()
            if text.startswith("::", i):
                i += 2
                continue
            paths.append(path)
            return i

    tree(start, [])
    return paths


def dependencies(module: tuple[str, ...], text: str, modules: set) -> set:
    deps = set()
    for match in re.finditer(r"\b(crate|super)::", text):
        if match.group(1) == "crate":
            base: tuple[str, ...] = ()
        else:
            base = module[:-1]
        start = match.end()
        while text.startswith("super::", start):
            base = base[:-1]
            start += len("super::")
        for path in use_tree_paths(text, start):
            full = base + tuple(path)
            # The longest module that the path names.
            for n in range(len(full), 0, -1):
                if full[:n] in modules:
                    deps.add(full[:n])
                    break
    return deps


def related(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return a[: len(b)] == b or b[: len(a)] == a


def cycles(crate: Path) -> list[list[tuple[str, ...]]]:
    src = crate / "src"
    # The library's modules; a binary's main.rs and src/bin/ are crates of their own.
    files = {
        module_of(src, f): f
        for f in sorted(src.rglob("*.rs"))
        if f.name != "main.rs" and "bin" not in f.relative_to(src).parts[:1]
    }
    modules = set(files)
    graph = {}
    for module, file in files.items():
        text = without_comments(without_tests(file.read_text()))
        graph[module] = {
            d for d in dependencies(module, text, modules) if not related(module, d)
        }
    # Tarjan's strongly connected components: a component of two or more is a cycle.
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(c, graph) for c in found]


def self_test() -> None:
    """The check itself: it must see a cycle through a use tree and through super::,
    and none between a parent and its child or in test code."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "forward").mkdir(parents=True)
        files = {
            "lib.rs": "pub mod a; pub mod b; pub mod c; pub mod forward;",
            "a.rs": "use crate::{b::{Thing, other}, c};",
            "b.rs": "pub struct Thing; // crate::c in a comment is not a use\n",
            "c.rs": "fn f() -> super::a::A { todo!() }",
            "forward/mod.rs": "mod net; pub use net::x; use crate::forward::net::y;",
            "forward/net.rs": "use super::Settings;\n#[cfg(test)]\nmod tests { use crate::a; }",
        }
        for name, text in files.items():
            (src / name).write_text(text)
        found = [sorted(map(name_of, c)) for c, _ in cycles(Path(tmp))]
        assert found == [["a", "c"]], found


def name_of(module: tuple[str, ...]) -> str:
    return "::".join(module) or "crate"


def main() -> int:
    self_test()
    failed = False
    for crate in map(Path, sys.argv[1:]):
        for component, graph in cycles(crate):
            failed = True
            print(f"{crate}: modules in a cycle: {', '.join(map(name_of, component))}")
            for module in component:
                inside = sorted(d for d in graph[module] if d in component)
                print(f"  {name_of(module)} -> {', '.join(map(name_of, inside))}")
    if not failed:
        print(f"no module cycles in {len(sys.argv) - 1} crates")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
