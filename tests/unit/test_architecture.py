"""The package's import structure (docs/ARCHITECTURE.md): no import cycles, and the layers import
only downwards — the library never imports a stage or the pipeline, configs import no library.

Imports are read from the source (every ``import`` statement, at module level or inside a
function), so a cycle hidden behind a function-level import counts too.
"""
import ast
import os

from conftest import ROOT

PACKAGE = "sigma_jax"


def _modules(top: str) -> dict:
  """{dotted module name: source path} of every .py file under ``ROOT/top``."""
  out = {}
  for root, _, files in os.walk(os.path.join(ROOT, top)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
  return out


def _imports(path: str, known) -> set:
  """The modules of ``known`` that the file imports (``from a import b`` counts ``a.b`` when
  that is a module, else ``a``)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
               for a in node.names]
    else:
      continue
    found.update(n for n in names if n in known)
  return found


def _graph(*tops) -> dict:
  mods = {}
  for top in tops:
    mods.update(_modules(top))
  return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def _cycle(graph: dict):
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
  graph = _graph(PACKAGE, "launch", "configs")
  assert len(graph) > 40  # the walk found the package
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_layers_import_downwards():
  graph = _graph(PACKAGE, "launch", "configs")
  # The pipeline and what runs it (the comparison's experiment runner) sit above the stages.
  upper = {m for m in graph if m in (f"{PACKAGE}.pipeline", f"{PACKAGE}.experiment")
           or m.startswith(f"{PACKAGE}.stages")}
  for m, deps in graph.items():
    if m.startswith(PACKAGE) and m not in upper:
      assert not deps & upper, f"library module {m} imports {sorted(deps & upper)}"
    if m.startswith("configs"):
      assert not any(d.startswith(PACKAGE) for d in deps), f"{m} imports the library: {deps}"
  # The work-directory layout is a leaf: everything may read it, it reads nothing.
  assert graph[f"{PACKAGE}.workdir"] == set()
