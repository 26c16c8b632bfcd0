"""The package's layout (docs/ARCHITECTURE.md): no import circle, small
training modules, errors.py below everything, the serving loader light.

The import graph is read from the source (every `import` statement, those
inside functions included), so a lazy import cannot hide a circle.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'mimicdet_jax')


def _module_name(path):
  rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _modules():
  out = {}
  for dirpath, _, names in os.walk(ROOT):
    for n in names:
      if n.endswith('.py'):
        path = os.path.join(dirpath, n)
        out[_module_name(path)] = path
  return out


def import_graph():
  """{module: set of mimicdet_jax modules it imports} (packages resolved to
  the module when `from pkg import mod` names one)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
      else:
        continue
      for t in targets:
        if t in modules and t != name:
          deps.add(t)
    graph[name] = deps
  return graph


def find_cycle(graph):
  """One cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def _without_packages(graph):
  # A package's __init__ re-exporting its modules is not a circle.
  packages = {m for m, p in _modules().items() if p.endswith('__init__.py')}
  return {m: {d for d in deps if d not in packages}
          for m, deps in graph.items() if m not in packages}


def test_find_cycle_finds_a_planted_circle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_circle_in_the_package():
  cycle = find_cycle(_without_packages(import_graph()))
  assert cycle is None, ' -> '.join(cycle)


def test_errors_imports_nothing_of_the_package():
  assert import_graph()['mimicdet_jax.errors'] == set()


def test_layers_point_down():
  """ops <- models <- targets <- losses <- data (data's transforms are read by
  losses, so data sits beside them: it imports none of the four); evaluation
  and serving never import training; serving's loader imports nothing of the
  package."""
  graph = import_graph()
  order = ['ops', 'models', 'targets', 'losses']
  above = ('mimicdet_jax.training', 'mimicdet_jax.evaluation',
           'mimicdet_jax.serving', 'mimicdet_jax.experiments',
           'mimicdet_jax.demo')
  for name, deps in graph.items():
    if name.split('.')[1:2] and name.split('.')[1] in order + ['data']:
      assert not any(d.startswith(above) for d in deps), (name, deps)
  for name, deps in graph.items():
    parts = name.split('.')
    if len(parts) > 1 and parts[1] in order:
      for d in deps:
        dp = d.split('.')
        if len(dp) > 1 and dp[1] in order:
          assert order.index(dp[1]) <= order.index(parts[1]), (name, d)
    if name.startswith(('mimicdet_jax.evaluation', 'mimicdet_jax.serving')):
      assert not any(d.startswith('mimicdet_jax.training') for d in deps), (
          name, deps)
  for name in graph:
    if name.startswith('mimicdet_jax.serving.detector'):
      assert graph[name] == set(), (name, graph[name])


@pytest.mark.parametrize('package,limit', [('training', 250)])
def test_modules_are_small(package, limit):
  folder = os.path.join(ROOT, package)
  for n in os.listdir(folder):
    if n.endswith('.py'):
      with open(os.path.join(folder, n)) as f:
        assert len(f.readlines()) <= limit, f'{package}/{n}'


def test_no_utils_module_and_every_module_says_its_concern():
  for name, path in _modules().items():
    assert 'utils' not in os.path.basename(path), path
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read()))
    assert doc, f'{path}: no opening docstring'


def test_longest_first_names_test_files_that_exist():
  """conftest.LONGEST_FIRST (the suite's file order under xdist) names real
  test files: a renamed file would silently drop back to collection order."""
  import conftest  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  missing = [n for n in conftest.LONGEST_FIRST
             if not os.path.isfile(os.path.join(here, n))]
  assert not missing and len(set(conftest.LONGEST_FIRST)) == len(
      conftest.LONGEST_FIRST)
