"""Each research switch of issue 10 changes the computation as stated.

mimic.* switches go through `losses.total.make_loss_fn` with a stand-in
detector (the model interface of docs/ARCHITECTURE.md) whose S-head outputs
are constant vectors (its parameters) and whose T-head outputs one vector for
boxes that overlap a gt (IoU >= 0.5, the T-head's foreground) and another for
the rest. Setting the foreground teacher equal to the student makes every
mimic distance 0 on foreground samples and d(student, background teacher) on
the others, so each variant's mimic term has a closed form computed here in
NumPy. model.staggered and s_head.deformable are checked on the real
MimicDet modules (small widths, NumPy-filled parameters), eval.head on
`postprocess.postprocess` against a NumPy decode.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import configs.demo
from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.losses import mimic
from mimicdet_jax.losses import total
from mimicdet_jax.models import heads
from mimicdet_jax.models import mimicdet
from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.ops import boxes as box_ops
from tests import standin

CANVAS = 128
LEVELS = (3, 4, 5, 6, 7)
NUM_LOGITS = 4  # 3 classes + background
REG_DIM = 6
GTS = ((10.0, 12.0, 60.0, 70.0), (70.0, 30.0, 118.0, 100.0))
GT_CLASSES = (1, 3)


class ProbeDetector(nn.Module):
  """Stand-in detector with S-head/T-head outputs the test controls.

  Dense outputs: refinement from a per-pixel layer (so proposals vary),
  S-head cls logits / reg feature / deltas = the parameter vectors of
  's_head' at every position. T-head: 't_head' parameters fg_* for boxes
  with IoU >= 0.5 with one of GTS, bg_* for the others.
  """

  def setup(self):
    self.stem = nn.Dense(8)
    self.refine = nn.Dense(5)
    zeros = nn.initializers.zeros
    self.s = {k: self.param(f's_{k}', zeros, (n,))
              for k, n in (('cls', NUM_LOGITS), ('reg', REG_DIM),
                           ('deltas', 4))}
    self.t = {k: self.param(f't_{k}', zeros, (n,))
              for k, n in (('fg_cls', NUM_LOGITS), ('bg_cls', NUM_LOGITS),
                           ('fg_reg', REG_DIM), ('bg_reg', REG_DIM),
                           ('deltas', 4))}

  def __call__(self, images, train=False):
    del train
    pooled, flat = standin.pooled_levels(nn.relu(self.stem(images)), LEVELS)
    r = self.refine(flat)
    b, a = flat.shape[:2]
    s = self.s
    return dict(t_features=pooled, refine_logits=r[..., 0],
                refine_deltas=0.1 * r[..., 1:],
                s_cls_logits=jnp.broadcast_to(s['cls'], (b, a, NUM_LOGITS)),
                s_reg_feature=jnp.broadcast_to(s['reg'], (b, a, REG_DIM)),
                s_deltas=jnp.broadcast_to(s['deltas'], (b, a, 4)))

  def t_head(self, t_features, boxes, box_levels=None):
    del t_features
    iou = box_ops.box_iou(boxes, jnp.asarray(GTS)[None])  # [B, N, G]
    fg = (jnp.max(iou, -1) >= 0.5)[..., None]
    cls = jnp.where(fg, self.t['fg_cls'], self.t['bg_cls'])
    reg = jnp.where(fg, self.t['fg_reg'], self.t['bg_reg'])
    return cls, reg, jnp.broadcast_to(self.t['deltas'], boxes.shape[:2] + (4,))


# Student vectors; the foreground teacher equals them, the background one not.
S_CLS = np.array([0.5, 2.0, -1.0, 0.3])
S_REG = np.array([1.0, 0.2, 0.0, 0.7, 0.4, 1.5])
BG_CLS = np.array([1.5, -0.5, 0.8, 0.0])
BG_REG = np.array([0.1, 1.3, 0.9, 0.0, 0.6, 0.2])


def probe_params(seed=0):
  """ProbeDetector parameters (NumPy; model.init would compile RNG draws)."""
  rng = np.random.default_rng(seed)
  dense = lambda i, o: dict(  # pylint: disable=g-long-lambda
      kernel=rng.normal(size=(i, o)) / np.sqrt(i), bias=0.1 * rng.normal(size=o))
  p = dict(stem=dense(3, 8), refine=dense(8, 5), s_cls=S_CLS, s_reg=S_REG,
           s_deltas=np.array([0.1, -0.1, 0.05, 0.0]), t_fg_cls=S_CLS,
           t_bg_cls=BG_CLS, t_fg_reg=S_REG, t_bg_reg=BG_REG,
           t_deltas=np.array([0.0, 0.1, -0.1, 0.05]))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def test_probe_params_match_flax_init():
  shapes = jax.eval_shape(ProbeDetector().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, CANVAS, CANVAS, 3)))['params']
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(
      lambda x: x.shape, probe_params())


def probe_config(**overrides):
  c = configs.demo.get_config()
  c.model.num_classes = NUM_LOGITS - 1
  c.s_head.num_logits = NUM_LOGITS
  c.data.canvas_buckets = ((CANVAS, CANVAS),)
  c.data.max_boxes = 4
  c.refine.num_samples = 32
  c.proposals.pre_nms_topk = 40
  c.proposals.num_proposals = 64
  c.t_head.num_samples = 16
  c.s_head.ohem_samples = 16
  c.mimic.weight = 0.5  # not 1, so the weight is visible in the total
  # SPEC's cosine mimic, whose closed forms these tests check (the demo
  # uses KL: test_distance below, test_losses_mimic.py).
  c.mimic.cls_distance = c.mimic.reg_distance = 'cosine'
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return ml_collections.FrozenConfigDict(c)


def probe_batch():
  g = 4
  boxes = np.zeros((1, g, 4), np.float32)
  boxes[0, :len(GTS)] = GTS
  mask = np.arange(g)[None] < len(GTS)
  classes = np.zeros((1, g), np.int32)
  classes[0, :len(GTS)] = GT_CLASSES
  rng = np.random.default_rng(1)
  return dict(
      image=jnp.asarray(rng.normal(size=(1, CANVAS, CANVAS, 3)), jnp.float32),
      image_size=jnp.array([[CANVAS, CANVAS]], jnp.int32),
      boxes=jnp.asarray(boxes), classes=jnp.asarray(classes),
      box_mask=jnp.asarray(mask), is_crowd=jnp.zeros((1, g), bool))


# Every variant's loss is traced into ONE jitted program (one for the forward
# terms, one for the gradients): XLA merges the parts the variants share, so
# nine variants compile in about the time of two. Low backend optimisation:
# these programs run once, compiling is what costs.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}
TEMPERATURE = 2.0
FORWARD_VARIANTS = {
    'default': {},  # both paths, cosine, stopped teacher, all samples
    'off': {'mimic.enabled': False},
    'cls': {'mimic.paths': 'cls'},
    'reg': {'mimic.paths': 'reg'},
    'foreground': {'mimic.samples': 'foreground'},
    'with_gt': {'mimic.include_gt': True},
    # fg_fraction 0.1: at most 1 of the 16 samples foreground, where the
    # mining keeps every foreground proposal (3 here).
    's_balanced': {'s_head.sampling': 'balanced', 's_head.fg_fraction': 0.1},
}


def _distance_variant(name):
  """`name` on every path it is valid for, else the last of that path's
  distances (so the two paths differ where they can: per-path routing)."""
  return {f'mimic.{path}_distance': name if name in names else names[-1]
          for path, names in mimic.PATH_DISTANCES.items()}


# One variant per distance of losses/mimic.py: a new one is checked here too.
FORWARD_VARIANTS.update({
    f'distance_{name}': dict(_distance_variant(name),
                             **{'mimic.temperature': TEMPERATURE})
    for name in mimic.DISTANCES})
GRAD_VARIANTS = {
    'default': {},
    'off': {'mimic.enabled': False},
    'flowing': {'mimic.teacher_grad': 'flowing'},
}


def _loss_fn(overrides):
  loss_fn = total.make_loss_fn(ProbeDetector(), probe_config(**overrides))
  batch = probe_batch()

  def fn(p):
    loss, aux = loss_fn(p, {}, batch, jax.random.PRNGKey(0))
    return dict(aux, loss=loss)

  return fn


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


S_KEYS = ('s_cls', 's_reg', 's_deltas')
T_KEYS = ('t_fg_cls', 't_bg_cls', 't_fg_reg', 't_bg_reg', 't_deltas')


def _perturb_teacher(params):
  p = dict(params)
  for k in T_KEYS:
    p[k] = params[k] + 0.37
  return p


@pytest.fixture(scope='module')
def aux_of():
  """{variant: every loss term and diagnostic}, same params, key and batch."""
  fns = {name: _loss_fn(o) for name, o in FORWARD_VARIANTS.items()}
  run = jax.jit(lambda p: {name: fn(p) for name, fn in fns.items()},
                compiler_options=FAST_COMPILE)
  return _np(run(probe_params()))


@pytest.fixture(scope='module')
def grads_of():
  """{variant: (grad of the total, grad of the mimic term)}, for the probe
  params and for the same params with every T-head parameter moved."""
  fns = {name: _loss_fn(o) for name, o in GRAD_VARIANTS.items()}

  def grads(p):
    return {name: (jax.grad(lambda q: fn(q)['loss'])(p),
                   jax.grad(lambda q: fn(q)['loss_mimic'])(p))
            for name, fn in fns.items()}

  run = jax.jit(grads, compiler_options=FAST_COMPILE)
  params = probe_params()
  return _np(run(params)), _np(run(_perturb_teacher(params)))


def np_cos_dist(a, b):
  return 1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def np_kl(student, teacher, t):
  p = np.exp(teacher / t) / np.exp(teacher / t).sum()
  q = np.exp(student / t) / np.exp(student / t).sum()
  return t * t * np.sum(p * np.log(p / q))


def np_smooth_l1(a, b):
  d = np.abs(a - b)
  return np.mean(np.where(d < 1.0, 0.5 * d * d, d - 0.5))


def np_l2(a, b):
  return np.mean((a - b)**2)


def _bg_fraction(aux):
  """Share of background among the T-head samples (the only non-zero ones)."""
  n = probe_config().t_head.num_samples
  # Enough valid proposals that every T-head sample slot is filled.
  assert aux['num_proposals'] >= n
  assert 0 < aux['t_num_fg'] < n  # both kinds are sampled
  return 1.0 - aux['t_num_fg'] / n


def _mimic_bg_fraction(aux):
  """Share of background among the mimic samples: every background sample is
  a proposal, but the appended gts (all foreground) are left out."""
  n = probe_config().t_head.num_samples
  assert aux['mimic_num_samples'] < n  # gts were sampled and left out
  return (n - aux['t_num_fg']) / aux['mimic_num_samples']


OTHER_TERMS = ('loss_refine_cls', 'loss_refine_reg', 'loss_s_cls',
               'loss_s_reg', 'loss_t_cls', 'loss_t_reg')


def test_default_mimic_closed_form_and_weight(aux_of):
  aux = aux_of['default']
  frac_bg = _mimic_bg_fraction(aux)
  assert frac_bg > _bg_fraction(aux)
  np.testing.assert_allclose(aux['loss_mimic_cls'],
                             frac_bg * np_cos_dist(S_CLS, BG_CLS), rtol=1e-5)
  np.testing.assert_allclose(aux['loss_mimic_reg'],
                             frac_bg * np_cos_dist(S_REG, BG_REG), rtol=1e-5)
  # mimic.weight = 0.5 scales the mimic term in the total.
  np.testing.assert_allclose(
      aux['loss'], sum(aux[k] for k in OTHER_TERMS) + 0.5 * aux['loss_mimic'],
      rtol=1e-5)


def test_s_head_balanced_sampling_changes_only_the_s_head_terms(aux_of):
  base, bal = aux_of['default'], aux_of['s_balanced']
  # Its own key: the refinement and T-head samplers draw as before.
  for k in ('loss_refine_cls', 'loss_refine_reg', 'loss_t_cls', 'loss_t_reg',
            'loss_mimic'):
    np.testing.assert_allclose(bal[k], base[k], rtol=1e-6)
  # At most s_head.fg_fraction foreground, and another mix than the mining's.
  np.testing.assert_allclose(bal['s_fg_share'], 1 / 16)
  np.testing.assert_allclose(base['s_fg_share'], 3 / 16)


def test_include_gt_puts_appended_gts_back_into_the_mimic(aux_of):
  aux = aux_of['with_gt']
  assert aux['mimic_num_samples'] == probe_config().t_head.num_samples
  frac_bg = _bg_fraction(aux)
  np.testing.assert_allclose(aux['loss_mimic_cls'],
                             frac_bg * np_cos_dist(S_CLS, BG_CLS), rtol=1e-5)
  np.testing.assert_allclose(aux['loss_mimic_reg'],
                             frac_bg * np_cos_dist(S_REG, BG_REG), rtol=1e-5)


def test_stopped_teacher_gets_no_mimic_gradient_student_does(grads_of):
  (grads, _) = grads_of
  _, g_mimic = grads['default']
  for k in T_KEYS:
    assert not g_mimic[k].any(), k
  assert np.abs(g_mimic['s_cls']).sum() > 0
  assert np.abs(g_mimic['s_reg']).sum() > 0


def test_mimic_on_student_gradient_depends_on_teacher(grads_of):
  grads, moved = grads_of
  g, g_moved = grads['default'][0], moved['default'][0]
  assert not np.allclose(g['s_cls'], g_moved['s_cls'])
  assert not np.allclose(g['s_reg'], g_moved['s_reg'])


def test_mimic_off_no_term_and_no_teacher_signal_in_student_gradient(
    aux_of, grads_of):
  aux = aux_of['off']
  assert 'loss_mimic_cls' not in aux and 'loss_mimic_reg' not in aux
  assert aux['loss_mimic'] == 0.0
  np.testing.assert_allclose(aux['loss'], sum(aux[k] for k in OTHER_TERMS),
                             rtol=1e-6)
  # Everything but the mimic term is the default's.
  for k in OTHER_TERMS:
    np.testing.assert_allclose(aux[k], aux_of['default'][k], rtol=1e-6)
  grads, moved = grads_of
  g, g_moved = grads['off'][0], moved['off'][0]
  # The S-head's gradient is the same whatever the T-head computes ...
  for k in S_KEYS:
    np.testing.assert_array_equal(g[k], g_moved[k])
  # ... and it is not zero: the S-head still learns from its own loss.
  assert np.abs(g['s_cls']).sum() > 0


def test_flowing_teacher_gets_mimic_gradient(grads_of):
  _, g_mimic = grads_of[0]['flowing']
  # Only background samples have a non-zero distance: the bg teacher moves,
  # the fg teacher (distance 0 at its minimum) does not.
  assert np.abs(g_mimic['t_bg_cls']).sum() > 0
  assert np.abs(g_mimic['t_bg_reg']).sum() > 0
  assert np.abs(g_mimic['s_cls']).sum() > 0


@pytest.mark.parametrize('paths', ['cls', 'reg'])
def test_single_path(paths, aux_of):
  aux = aux_of[paths]
  other = 'reg' if paths == 'cls' else 'cls'
  assert f'loss_mimic_{other}' not in aux
  # Same key, same samples: the kept path equals its value with both paths.
  np.testing.assert_allclose(aux['loss_mimic'],
                             aux_of['default'][f'loss_mimic_{paths}'],
                             rtol=1e-5)


def test_foreground_samples_only(aux_of):
  # The foreground teacher equals the student: distance 0 on every fg sample,
  # so only background samples made the default's mimic term non-zero.
  aux = aux_of['foreground']
  assert aux['t_num_fg'] > 0 and aux_of['default']['loss_mimic'] > 0.1
  assert abs(aux['loss_mimic']) < 1e-6
  np.testing.assert_allclose(aux['mimic_cos_cls'], 1.0, rtol=1e-5)
  np.testing.assert_allclose(aux['mimic_cos_reg'], 1.0, rtol=1e-5)


def _np_distance(name):
  """The closed form of a known distance; for one added since, the module's
  function (its values are tested in test_losses_mimic.py; here, that the
  loss routes each path's distance to that path on the right samples)."""
  known = {'cosine': np_cos_dist, 'l2': np_l2, 'smooth_l1': np_smooth_l1,
           'kl': lambda s, t: np_kl(s, t, TEMPERATURE)}
  if name in known:
    return known[name]
  return lambda s, t: float(mimic.DISTANCES[name](
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), TEMPERATURE))


@pytest.mark.parametrize('distance', tuple(mimic.DISTANCES))
def test_distance(distance, aux_of):
  aux = aux_of[f'distance_{distance}']
  frac_bg = _mimic_bg_fraction(aux)
  variant = _distance_variant(distance)
  for path, s, t in (('cls', S_CLS, BG_CLS), ('reg', S_REG, BG_REG)):
    want = _np_distance(variant[f'mimic.{path}_distance'])
    np.testing.assert_allclose(aux[f'loss_mimic_{path}'],
                               frac_bg * want(s, t), rtol=1e-4)


# ------------------------------------------------------- real model switches


def small_config(**overrides):
  """configs/demo.py with narrow heads, resolved for 5 classes."""
  c = configs.demo.get_config()
  c.model.fpn_channels = c.refine.channels = c.s_head.channels = 8
  c.s_head.offset_hidden = (4, 4)
  c.s_head.cls_dim = c.s_head.reg_dim = c.t_head.fc_dim = 16
  c.t_head.conv_dim = 8
  c.t_head.num_convs = 1
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return config_lib.resolve(c, 5)


def np_fill(shapes, seed=0):
  """Normal(0, 1/fan_in) leaves shaped like `shapes` (NumPy, no RNG compile)."""
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)

  return jax.tree.map(fill, shapes)


def _model_shapes(config):
  """The model and its variable shapes (eval_shape: traced, not compiled)."""
  model = mimicdet.MimicDet(config)
  images = jax.ShapeDtypeStruct((1, CANVAS, CANVAS, 3), jnp.float32)
  return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


@pytest.mark.parametrize('staggered', [True, False])
def test_staggered_switch_sets_the_levels_the_t_head_reads(staggered):
  config = small_config(**{'model.staggered': staggered})
  model, variables = _model_shapes(config)
  want = (2, 3, 4, 5, 6) if staggered else (3, 4, 5, 6, 7)
  assert mimicdet.t_head_levels(config) == want
  assert ('lateral_c2' in variables['params']['fpn']) == staggered
  # Behaviour: perturb one level at a time and see which boxes notice. The
  # FPN rule floor(4 + log2(sqrt(wh) / 224)), clamped to the levels read,
  # sends a 16 px box to the lowest level (P2 staggered, P3 not) and a
  # 1800 px box (>= 224 * 2**3) to the highest (P6 staggered, P7 not).
  feats = {l: jnp.asarray(np.random.default_rng(l).normal(
      size=(1, CANVAS >> l, CANVAS >> l, 8)), jnp.float32) for l in want}
  boxes = jnp.array([[[40.0, 40.0, 56.0, 56.0], [0.0, 0.0, 1800.0, 1800.0]]])
  params = {'params': {'t_head_net': np_fill(
      variables['params']['t_head_net'])}}
  t_head = jax.jit(lambda v, f: model.apply(v, f, boxes, method='t_head')[0],
                   compiler_options=FAST_COMPILE)
  base = np.asarray(t_head(params, feats))
  reads = {}
  for level in want:
    moved = dict(feats)
    moved[level] = feats[level] + 1.0
    reads[level] = np.abs(np.asarray(t_head(params, moved)) - base).max(-1)[0]
  for box, level_read in ((0, min(want)), (1, max(want))):
    for level in want:
      if level == level_read:
        assert reads[level][box] > 1e-4, (box, level, reads)
      else:
        assert reads[level][box] == 0.0, (box, level, reads)


@pytest.mark.parametrize('rule', ['staggered', 'fpn'])
def test_level_rule_sets_the_level_a_proposal_is_pooled_from(rule):
  # A 64 px proposal refined from a P4 anchor: the staggered rule pools it
  # from P3 (one level finer), the FPN rule from floor(4 + log2(64 / 224))
  # = P2. Perturb one level at a time and see which one the T-head reads.
  config = small_config(**{'t_head.level_rule': rule})
  model, variables = _model_shapes(config)
  levels = mimicdet.t_head_levels(config)
  anchors = anchors_lib.dense_anchors((CANVAS, CANVAS), config.model.s_levels,
                                      config.model.anchor_scale)
  origin = int(np.flatnonzero(anchors['level'] == 4)[0])
  box_levels = mimicdet.t_head_box_levels(config, anchors['level'],
                                          jnp.array([[origin]]))
  assert (box_levels is None) == (rule == 'fpn')
  feats = {l: jnp.asarray(np.random.default_rng(l).normal(
      size=(1, CANVAS >> l, CANVAS >> l, 8)), jnp.float32) for l in levels}
  boxes = jnp.array([[[8.0, 8.0, 72.0, 72.0]]])
  params = {'params': {'t_head_net': np_fill(
      variables['params']['t_head_net'])}}
  t_head = jax.jit(
      lambda v, f: model.apply(v, f, boxes, box_levels, method='t_head')[0],
      compiler_options=FAST_COMPILE)
  base = np.asarray(t_head(params, feats))
  read = []
  for level in levels:
    moved = dict(feats)
    moved[level] = feats[level] + 1.0
    if np.abs(np.asarray(t_head(params, moved)) - base).max() > 1e-4:
      read.append(level)
  assert read == [{'staggered': 3, 'fpn': 2}[rule]]


def test_t_head_box_levels_staggered_and_unstaggered():
  anchors = anchors_lib.dense_anchors((CANVAS, CANVAS), (3, 4, 5, 6, 7), 4.0)
  origin = jnp.asarray([[int(np.flatnonzero(anchors['level'] == l)[0])
                         for l in (3, 4, 5, 6, 7)]])
  staggered = mimicdet.t_head_box_levels(
      small_config(**{'t_head.level_rule': 'staggered'}), anchors['level'],
      origin)
  np.testing.assert_array_equal(staggered, [[2, 3, 4, 5, 6]])
  # model.staggered=False: the T-head reads P3..P7, each box at its origin.
  same = mimicdet.t_head_box_levels(
      small_config(**{'model.staggered': False,
                      't_head.level_rule': 'staggered'}),
      anchors['level'], origin)
  np.testing.assert_array_equal(same, [[3, 4, 5, 6, 7]])
  with pytest.raises(ValueError, match='t_head.level_rule'):
    small_config(**{'t_head.level_rule': 'x'})


@pytest.mark.parametrize('deformable', [True, False])
def test_deformable_switch(deformable):
  config = small_config(**{'s_head.deformable': deformable})
  _, variables = _model_shapes(config)
  flat = flax.traverse_util.flatten_dict(variables['params']['s_head_net'])
  assert any('offset_net' in k for k in flat) == deformable
  # Behaviour: the S-head's output depends on the refinement deltas (the
  # offset micro-net's input) only when deformable.
  head = heads.SHead(levels=(3, 4), num_logits=6, channels=8, p3_kernel=3,
                     kernel=5, offset_hidden=(4, 4), cls_dim=16, reg_dim=16,
                     deformable=deformable)
  rng = np.random.default_rng(0)
  feats = {l: jnp.asarray(rng.normal(size=(1, 64 >> l, 64 >> l, 8)),
                          jnp.float32) for l in (3, 4)}
  deltas = {l: jnp.asarray(rng.normal(size=(1, 64 >> l, 64 >> l, 4)),
                           jnp.float32) for l in (3, 4)}
  # np_fill also fills the offset layer (zero at init), so offsets move.
  params = np_fill(jax.eval_shape(head.init, jax.random.PRNGKey(0), feats,
                                  deltas))
  apply = jax.jit(lambda d: head.apply(params, feats, d)[3][0],
                  compiler_options=FAST_COMPILE)
  moved = apply({l: d + 1.0 for l, d in deltas.items()})
  changed = float(jnp.max(jnp.abs(moved - apply(deltas))))
  assert (changed > 1e-4) == deformable, changed


# -------------------------------------------------------------- eval.head


def _np_decode(deltas, ref, stds):
  w, h = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
  cx, cy = ref[:, 0] + 0.5 * w, ref[:, 1] + 0.5 * h
  d = deltas * np.asarray(stds)
  cx, cy = cx + d[:, 0] * w, cy + d[:, 1] * h
  w, h = w * np.exp(d[:, 2]), h * np.exp(d[:, 3])
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('head', ['s', 't', 'both'])
def test_eval_head_switch(head):
  c = configs.demo.get_config()
  c.eval.head = head
  c.t_head.level_rule = 'staggered'  # the T-head gets per-box levels
  c.eval.pre_nms_topk = 1
  c.eval.max_detections = 3
  c.eval.score_threshold = 0.0
  c.model.num_classes = 2
  c.s_head.num_logits = 3
  config = ml_collections.FrozenConfigDict(c)
  anchors = np.array([[20.0, 20.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]])
  s_cls = np.array([[[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])  # S: class 1
  t_cls = np.array([[[0.0, -1.0, 2.0]]])  # T: class 2
  s_deltas = np.array([[[0.5, 0.0, 0.0, 0.0], [0.0] * 4]])
  t_deltas = np.array([[[0.0, -0.5, 0.3, 0.0]]])
  outputs = dict(refine_logits=jnp.array([[5.0, -5.0]]),
                 refine_deltas=jnp.zeros((1, 2, 4)),
                 s_cls_logits=jnp.asarray(s_cls, jnp.float32),
                 s_deltas=jnp.asarray(s_deltas, jnp.float32))
  calls = []

  def t_head_fn(boxes, box_levels):
    calls.append(box_levels)
    return (jnp.asarray(t_cls, jnp.float32), None,
            jnp.asarray(t_deltas, jnp.float32))

  dets = jax.tree.map(np.asarray, postprocess.postprocess(
      outputs, jnp.asarray(anchors, jnp.float32), jnp.array([[128, 128]]),
      config, t_head_fn, anchor_level=np.array([4, 3], np.int32)))
  if calls:  # the position from P4 is pooled from P3 (staggered rule)
    np.testing.assert_array_equal(np.asarray(calls[0]), [[3]])
  assert bool(calls) == (head != 's')  # the T-head runs only when asked
  refined = anchors[:1]  # zero refinement deltas: the anchor itself
  s_box = _np_decode(s_deltas[0, :1], refined, config.s_head.stds)[0]
  t_box = _np_decode(t_deltas[0], refined, config.t_head.stds)[0]
  s_p, t_p = _softmax(s_cls[0, 0])[1:], _softmax(t_cls[0, 0])[1:]
  probs, box = {'s': (s_p, s_box), 't': (t_p, t_box),
                'both': ((s_p + t_p) / 2, (s_box + t_box) / 2)}[head]
  # One box, two classes: both (box, class) pairs, best first.
  order = np.argsort(-probs)
  np.testing.assert_array_equal(dets['classes'][0, :2], order + 1)
  np.testing.assert_allclose(dets['scores'][0, :2], probs[order], rtol=1e-5)
  for m in range(2):
    np.testing.assert_allclose(dets['boxes'][0, m], box, rtol=1e-5, atol=1e-4)
  assert dets['classes'][0, 0] == {'s': 1, 't': 2, 'both': 1}[head]
  assert not dets['valid'][0, 2]
