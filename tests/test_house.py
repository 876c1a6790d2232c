"""The house rules, checked: the import graph has no cycle and the library never imports the app; no module is
over ~600 lines; every relative link in README.md and docs/ resolves; the README stays a front door."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"omni_lightning": REPO / "omni_lightning", "omni_lightning.callbacks": REPO / "callbacks"}


def modules() -> dict[str, Path]:
    """Module name -> file, for the package (callbacks/ installs as omni_lightning.callbacks)."""
    out = {}
    for prefix, root in PACKAGE_DIRS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, at any depth (function-local imports count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # edges to a package's __init__ are kept: importing a package runs its __init__
    return {m: imports(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    g = graph()
    assert "omni_lightning.fusion.engine" in g and "omni_lightning.callbacks.preemption" in g
    assert cycles(g) == []


def test_the_library_never_imports_the_app():
    g = graph()
    offenders = {m: sorted(d for d in deps if d.startswith("omni_lightning.app"))
                 for m, deps in g.items() if not m.startswith("omni_lightning.app") and m != "omni_lightning.__main__"}
    assert {m: d for m, d in offenders.items() if d} == {}
    assert g["omni_lightning.__main__"] == {"omni_lightning.app.cli"}  # the entry point is the one way in


def test_the_library_never_imports_callbacks():
    """Library code (drift measurement, retrieval examples, metric names) lives in the library and the callbacks
    import it, never the other way round."""
    g = graph()
    offenders = {m: sorted(d for d in deps if d.startswith("omni_lightning.callbacks"))
                 for m, deps in g.items() if not m.startswith(("omni_lightning.callbacks", "omni_lightning.app"))}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_module_is_a_monolith():
    big = {str(p.relative_to(REPO)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}


def _links(md: Path) -> list[tuple[str, str]]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links inside code blocks are not links
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text) and [
        (md.name, t) for t in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 8
    broken = []
    for page in pages:
        for _, target in _links(page):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md":
                headings = {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", dest.read_text(), flags=re.M)}
                if anchor not in headings:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    assert "make demo" in readme.split("\n\n")[1] and "make test" in readme.split("\n\n")[1]
    for page in ("method", "results", "fusion", "data", "evaluation", "benchmarks", "slurm"):
        assert f"docs/{page}.md" in readme, page


def test_no_file_cites_internal_notes():
    cited = [str(p.relative_to(REPO)) for p in [*REPO.glob("**/*.py"), *REPO.glob("**/*.md"), *REPO.glob("**/*.yaml"),
                                                *REPO.glob("**/*.sh")]
             if ".venv" not in p.parts and p.name != "test_house.py"
             and re.search(r"\b(DESIGN|METHOD)\.md", p.read_text())]
    assert cited == []
