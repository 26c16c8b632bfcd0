"""The README and the recipes agree with the one source of the demo's figures.

`mimicdet_jax.demo.REFERENCE` holds the demo recipe's measured figures (AP
of both heads over the protocol's seeds, S / T, step time, minutes); the
README's `make demo` lines quote it, docs/RESULTS.md's table of the current
recipe is where it was measured, configs/demo.py holds the step count, and
the recipes' comments point at docs instead of restating figures; the
"Current" summaries at the top of docs/BENCHMARKS.md and docs/S_HEAD_GAP.md
restate figures recorded below them.
"""
import glob
import io
import os
import re
import statistics
import tokenize

from configs import demo as demo_config
from mimicdet_jax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A number not glued to a word or to another number's dot: 0.66, 2200, 9.
NUMBER = re.compile(r'(?<![\w.])\d+(?:\.\d+)?')
# The README's other numbers in those lines: the machines' 2 cores, "2x".
README_OTHER_NUMBERS = {'2'}


def _read(path):
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def _make_demo_comment():
  """The comment beside `make demo` in the README's command block, as one line."""
  text = _read('README.md')
  block = re.search(r'^make demo +#.*?(?=^make test)', text, re.S | re.M)
  assert block, 'README: the `make demo   # ...` lines not found'
  return ' '.join(line.split('#', 1)[1].strip()
                  for line in block.group(0).splitlines() if '#' in line)


def _expected_readme_numbers():
  r = demo.REFERENCE
  return {
      str(r['seeds']),
      *(f'{v:.2f}' for key in ('s_ap', 's_ap50', 't_ap') for v in r[key]),
      *(f'{v:.3f}' for v in r['s_over_t']),
      *(f'{v:.2f}' for v in r['step_s']),
      *(f'{v:g}' for v in r['train_min']),
      str(demo_config.get_config().train.total_steps),
  }


def test_readme_make_demo_figures_are_the_reference():
  """Every number of the README's `make demo` lines is a REFERENCE figure or
  configs/demo.py's step count, and each of those is there."""
  found = set(NUMBER.findall(_make_demo_comment()))
  expected = _expected_readme_numbers()
  assert found - README_OTHER_NUMBERS == expected, (
      f'README `make demo` lines: not in mimicdet_jax.demo.REFERENCE or '
      f'configs/demo.py: {sorted(found - README_OTHER_NUMBERS - expected)}; '
      f'missing: {sorted(expected - found)}')


def _current_recipe_section():
  text = _read('docs/RESULTS.md')
  section = re.search(r'^### [^\n]*\(the current recipe[^\n]*\n(.*?)(?=^##)', text,
                      re.S | re.M)
  assert section, 'docs/RESULTS.md: no "### ... (the current recipe ..." section'
  return section.group(1)


def test_reference_is_what_results_md_measured():
  """REFERENCE's AP ranges and S / T are those of RESULTS.md's per-seed table
  of the current recipe, its step and minutes those of the fresh-clone run
  printed there."""
  section = _current_recipe_section()
  r = demo.REFERENCE
  rows = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    seed = re.match(r'(\d+)\b', cells[0])
    if len(cells) == 5 and seed and int(seed.group(1)) < r['seeds']:
      rows[int(seed.group(1))] = [float(c.strip('*')) for c in cells[1:]]
  assert sorted(rows) == list(range(r['seeds'])), rows
  columns = list(zip(*rows.values()))  # S AP, S AP50, T AP, S / T
  for key, values in zip(('s_ap', 's_ap50', 't_ap'), columns):
    assert (round(min(values), 2), round(max(values), 2)) == r[key], key
  s_over_t = columns[3]
  assert (round(statistics.mean(s_over_t), 3),
          round(statistics.stdev(s_over_t), 3)) == r['s_over_t']
  assert f'{r["step_s"][0]:.2f} s per training step here' in section
  assert f'training {r["train_min"][0]:.1f} min' in section
  assert f'step ~{r["step_s"][1]:.2f} s' in section
  assert re.search(rf'~{r["train_min"][1]:g}(\.\d)? minutes', section)


def _comments(path):
  with open(path) as f:
    tokens = tokenize.generate_tokens(io.StringIO(f.read()).readline)
    return [t.string for t in tokens if t.type == tokenize.COMMENT]


def test_recipe_comments_point_at_docs_instead_of_quoting_figures():
  """A recipe's comments give a reason and an experiment (E22, docs/...), not
  AP, S / T or time figures that drift from the README (STYLE.md 10)."""
  # AP / S-T figures (any comment that speaks of AP or S / T) and timings;
  # a rate or a factor of the recipe itself ("lr 0.1 at 64 images") is fine.
  figure = re.compile(r'\bAP\d*\b|\bS ?/ ?T\b|\d ?%'
                      r'|\d+(?:\.\d+)? ?(?:ms|s a step|s/step|min(?:utes)?)\b'
                      r'|\d(?:\.\d+)?x (?:step|faster|slower)')
  for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))):
    if os.path.basename(path) == 'common.py':
      continue
    for comment in _comments(path):
      assert not figure.search(comment), f'{os.path.basename(path)}: {comment}'


def _current_and_rest(path):
  text = _read(path)
  current = re.search(r'^## Current\n(.*?)(?=^## )', text, re.S | re.M)
  assert current, f'{path}: no "## Current" section'
  return current.group(1), text[:current.start()] + text[current.end():]


def test_current_sections_copy_figures_from_the_records():
  """The "Current" summaries of docs/BENCHMARKS.md and docs/S_HEAD_GAP.md
  restate figures measured further down (or in docs/RESULTS.md): every
  decimal and every number from 100 up is found there, as written or
  rounded, and every "mean ± std" as written."""
  results = _read('docs/RESULTS.md')
  for path in ('docs/BENCHMARKS.md', 'docs/S_HEAD_GAP.md'):
    current, rest = _current_and_rest(path)
    recorded = set()
    for n in NUMBER.findall(rest + results):  # as written, or rounded
      digits = len(n.partition('.')[2])
      recorded.update(f'{float(n):.{d}f}' for d in range(digits + 1))
    figures = {n for n in NUMBER.findall(current) if '.' in n or int(n) >= 100}
    assert figures, path
    assert figures <= recorded, f'{path} "Current": {sorted(figures - recorded)} not recorded'
    for mean_std in re.findall(r'\d+(?:\.\d+)? ± \d+(?:\.\d+)?', current):
      assert mean_std in rest + results, f'{path} "Current": {mean_std} not recorded'


def _architecture_module_list():
  """The modules docs/ARCHITECTURE.md's "One line per module" block names:
  `mimicdet_jax/x/y.py ...` lines, and `mimicdet_jax/x/  a.py, b.py ...`
  lines for a folder's files."""
  text = _read('docs/ARCHITECTURE.md')
  block = re.search(r'One line per module:\n```\n(.*?)```', text, re.S)
  assert block, 'docs/ARCHITECTURE.md: no "One line per module" block'
  named = set()
  for line in block.group(1).splitlines():
    if not line.startswith('mimicdet_jax/'):
      continue
    path, rest = (line.split(None, 1) + [''])[:2]
    if path.endswith('.py'):
      named.add(path)
    else:
      named.update(path.rstrip('/') + '/' + name
                   for name in re.findall(r'\b(\w+\.py)\b', rest))
  return named


def test_architecture_lists_every_module():
  named = _architecture_module_list()
  modules = set()
  for dirpath, _, names in os.walk(os.path.join(REPO, 'mimicdet_jax')):
    modules.update(os.path.relpath(os.path.join(dirpath, n), REPO)
                   for n in names if n.endswith('.py') and n != '__init__.py')
  assert not modules - named, (
      f'docs/ARCHITECTURE.md, "One line per module", lacks {sorted(modules - named)}')
  assert not named - modules, (
      f'docs/ARCHITECTURE.md names modules that do not exist: {sorted(named - modules)}')


def _config(name):
  return __import__(f'configs.{name}', fromlist=['get_config']).get_config()


def test_readme_configs_table_and_photos_line_agree_with_the_recipes():
  """What the README says of a recipe (steps, batch, lr, canvas, scales,
  heads' norm, mimic, S-head lr, head samples) is what the file sets."""
  text = _read('README.md')
  rows = re.findall(r'^\| `configs/(\w+)\.py` \| (.*) \|$', text, re.M)
  assert {name for name, _ in rows} >= {'mimicdet_r50_fpn_1x', 'demo', 'photos'}
  for name, says in rows:
    c = _config(name)
    says = says.split(' (')[0]  # the recipe, not the figures after it
    for steps in re.findall(r'\b(\d+)k steps', says):
      assert c.train.total_steps == int(steps) * 1000, (name, says)
    for batch in re.findall(r'\bbatch (\d+)', says):
      assert c.train.batch_size == int(batch), (name, says)
    for lr in re.findall(r'\blr (\d\S*\d)', says):
      assert c.optim.base_lr == float(lr), (name, says)
    for h, w in re.findall(r'\b(\d+)x(\d+)\b', says):
      assert (int(h), int(w)) in c.data.canvas_buckets, (name, says)
    for lo, hi in re.findall(r'multi-scale (\d+)\.\.(\d+)', says):
      sizes = c.data.train_min_sizes
      assert (min(sizes), max(sizes)) == (int(lo), int(hi)), (name, says)
    if 'GroupNorm heads' in says:
      assert c.t_head.norm == c.s_head.norm == 'group_norm', (name, says)
    if 'KL mimic' in says:
      assert 'kl' in {c.mimic.get(k) for k in ('distance', 'cls_distance')}, name
    for weight in re.findall(r'mimic at weight (\d+)', says):
      assert c.mimic.weight == float(weight), (name, says)
    for mult in re.findall(r'S-head lr x(\d+)', says):
      assert c.optim.s_head_lr_mult == float(mult), (name, says)
  c = _config('photos')
  line = (f'{c.t_head.num_samples} / {c.s_head.ohem_samples} samples and '
          f'{c.train.total_steps} steps')
  assert line in ' '.join(text.split()), f'README: the photos line should say "{line}"'


# The docs whose sections moved to docs/HISTORY.md (issue 41): a reference to
# one of their sections must still find it.
RESTRUCTURED = ('BENCHMARKS', 'S_HEAD_GAP', 'HISTORY')


def test_references_to_sections_of_the_restructured_docs_resolve():
  """Every `docs/<DOC>.md, "<section>"` in the code, configs, tests, Makefile
  and docs names text that is in that doc (a heading or a bold item)."""
  reference = re.compile(r'docs/(%s)\.md,\s+"([^"]+)"' % '|'.join(RESTRUCTURED))
  docs = {}
  for name in RESTRUCTURED:
    text = _read(f'docs/{name}.md')
    anchors = re.findall(r'^#+ (.*)$', text, re.M) + re.findall(r'\*\*(.+?)\*\*', text, re.S)
    docs[name] = '\n'.join(' '.join(a.split()).lower() for a in anchors)
  missing = []
  for top in ('configs', 'mimicdet_jax', 'tests', 'benchmarks', 'docs'):
    for dirpath, _, names in os.walk(os.path.join(REPO, top)):
      for n in names:
        if n.endswith(('.py', '.md')):
          path = os.path.join(dirpath, n)
          with open(path) as f:
            text = f.read()
          for m in reference.finditer(text):
            if ' '.join(m.group(2).split()).lower() not in docs[m.group(1)]:
              missing.append(f'{os.path.relpath(path, REPO)}: {m.group(0)}')
  for path in ('README.md', 'Makefile'):
    for m in reference.finditer(_read(path)):
      if ' '.join(m.group(2).split()).lower() not in docs[m.group(1)]:
        missing.append(f'{path}: {m.group(0)}')
  assert not missing, missing
