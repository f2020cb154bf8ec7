#!/usr/bin/env python3
"""Module dependency cycles in src/, one node per module file.

Every `crate::a::b::Item` or `super::…` path outside comments and `#[cfg(test)]` blocks
(test code may reach anywhere) is resolved to the deepest module that has a file, and
makes an edge from the file's module to that module. Edges between a module and its own
ancestor are left out: a parent declaring and re-exporting its children, and children
using their parent's shared types, is how Rust modules nest, not a layering cycle.
Prints each strongly connected component of more than one module with the lines that
make its edges and exits 1 if there is any; `--all` also prints every edge.
Usage: scripts/modcycles.py [--all] [SRC_DIR]
"""
import os, re, sys

show_all = "--all" in sys.argv
args = [a for a in sys.argv[1:] if not a.startswith("--")]
root = args[0] if args else "src"

def file_module(rel):
    parts = rel[:-3].split("/")
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)

modules = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if f.endswith(".rs"):
            full = os.path.join(dirpath, f)
            modules[file_module(os.path.relpath(full, root))] = full

def resolve(parts):
    """Deepest module with a file that prefixes `parts`."""
    for n in range(len(parts), -1, -1):
        if tuple(parts[:n]) in modules:
            return tuple(parts[:n])
    return ()

def expand(text, i):
    """Paths in a brace group starting at text[i] == '{'; returns (paths, end)."""
    out, cur, j = [], "", i + 1
    while j < len(text):
        c = text[j]
        if c == "{":
            sub, j = expand(text, j)
            out += [cur + s for s in sub]
            cur = ""
        elif c == "}":
            if cur.strip():
                out.append(cur.strip())
            return out, j
        elif c == ",":
            if cur.strip():
                out.append(cur.strip())
            cur = ""
        else:
            cur += c
        j += 1
    return out, j

HEAD = re.compile(r"\b(crate|super)((?:::super)*)((?:::[A-Za-z_][A-Za-z0-9_]*)*)(::\{)?")

def strip_tests(text):
    """Drops `#[cfg(test)]` items (a `mod tests { … }` or a single item) and comments."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    while True:
        k = text.find("#[cfg(test)]", i)
        if k < 0:
            out.append(text[i:])
            break
        out.append(text[i:k])
        j = k + len("#[cfg(test)]")
        # the item ends at its first top-level ';' or its first closed '{…}'
        depth = 0
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            elif c == ";" and depth == 0:
                j += 1
                break
            j += 1
        i = j
    return "".join(out)

edges = {}
for mod, full in modules.items():
    if "tests" in mod:
        continue
    raw = open(full).read()
    text = strip_tests(raw)
    for m in HEAD.finditer(text):
        if m.group(1) == "crate":
            base = []
        else:
            ups = 1 + m.group(2).count("super")
            # `super` of a mod.rs/lib.rs module is its parent module, as for any file
            base = list(mod[: len(mod) - ups])
        tail = [p for p in m.group(3).split("::") if p]
        paths = [base + tail]
        if m.group(4):
            group, _ = expand(text, m.end() - 1)
            paths = [base + tail + [p for p in g.split("::") if p and p != "self"] for g in group]
        line = text[: m.start()].count("\n")
        for p in paths:
            dst = resolve(p)
            if dst == mod or dst == mod[: len(dst)] or mod == dst[: len(mod)]:
                continue  # itself, an ancestor, or a descendant
            edges.setdefault((mod, dst), []).append(text.split("\n")[line].strip())

graph = {}
for a, b in edges:
    graph.setdefault(a, set()).add(b)
    graph.setdefault(b, set())

index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in sorted(graph[v]):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        sccs.append(comp)
sys.setrecursionlimit(10000)
for v in sorted(graph):
    if v not in index:
        visit(v)

name = lambda m: "::".join(m) or "crate"
if show_all:
    for a in sorted(graph):
        print(f"{name(a)} -> {', '.join(sorted(name(b) for b in graph[a]))}")
cyclic = [c for c in sccs if len(c) > 1]
for c in cyclic:
    print("cycle among:", ", ".join(sorted(name(m) for m in c)))
    for (a, b), lines in sorted(edges.items()):
        if a in c and b in c:
            print(f"  {name(a)} -> {name(b)}: {lines[0]}")
print(f"{len(modules)} modules, {len(edges)} edges:",
      "no module cycle" if not cyclic else f"{len(cyclic)} cyclic component(s)")
sys.exit(1 if cyclic else 0)
