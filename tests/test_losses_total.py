"""total_loss wiring: on a tiny stand-in detector (fast) and on MimicDet (slow).

The tiny detector implements the model interface of docs/ARCHITECTURE.md
(`__call__` -> dense dict, `t_head` method) with a few dense layers, so the
wiring of targets, proposals, sampling, OHEM and mimic compiles in seconds.
The slow tests run the real MimicDet on the demo config.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import configs.demo
from mimicdet_jax.losses import total
from tests import standin

CANVAS = 128
LEVELS = (3, 4, 5, 6, 7)


class TinyDetector(nn.Module):
  """Same outputs as MimicDet, from a per-pixel layer and average pooling."""
  num_logits: int
  feature_dim: int

  def setup(self):
    self.stem = nn.Dense(8)  # per pixel: convolutions compile slowly on CPU
    self.refine = nn.Dense(5)
    self.s_cls = nn.Dense(self.num_logits)
    self.s_reg = nn.Dense(self.feature_dim)
    self.s_delta = nn.Dense(4)
    self.t_fc = nn.Dense(self.feature_dim)
    self.t_cls = nn.Dense(self.num_logits)
    self.t_delta = nn.Dense(4)

  def __call__(self, images, train=False):
    del train
    pooled, flat = standin.pooled_levels(nn.relu(self.stem(images)), LEVELS)
    r = self.refine(flat)
    reg = nn.relu(self.s_reg(flat))
    if self.is_initializing():
      self.t_head(pooled, jnp.zeros((images.shape[0], 1, 4)))
    return dict(t_features=pooled, refine_logits=r[..., 0],
                refine_deltas=0.1 * r[..., 1:], s_cls_logits=self.s_cls(flat),
                s_reg_feature=reg, s_deltas=0.1 * self.s_delta(reg))

  def t_head(self, t_features, boxes, box_levels=None):
    g = jnp.mean(t_features[3], axis=(1, 2))[:, None, :]
    g = jnp.broadcast_to(g, boxes.shape[:2] + g.shape[-1:])
    h = nn.relu(self.t_fc(jnp.concatenate([g, boxes / CANVAS], -1)))
    return self.t_cls(h), h, 0.1 * self.t_delta(h)


def tiny_params(seed=0):
  """TinyDetector parameters drawn in NumPy (model.init compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = dict(stem=(3, 8), refine=(8, 5), s_cls=(8, 4), s_reg=(8, 16),
                s_delta=(16, 4), t_fc=(12, 16), t_cls=(16, 4), t_delta=(16, 4))
  return {name: dict(kernel=jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i),
                                        jnp.float32),
                     bias=jnp.asarray(0.1 * rng.normal(size=o), jnp.float32))
          for name, (i, o) in shapes.items()}


def test_tiny_params_match_flax_init():
  model = TinyDetector(num_logits=4, feature_dim=16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, CANVAS, CANVAS, 3)))['params']
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(
      lambda x: x.shape, tiny_params())


def tiny_config(**overrides):
  c = configs.demo.get_config()
  c.model.num_classes = 3
  c.s_head.num_logits = 4
  c.data.canvas_buckets = ((CANVAS, CANVAS),)
  c.data.max_boxes = 6
  c.refine.num_samples = 32
  c.proposals.pre_nms_topk = 40
  c.proposals.num_proposals = 64
  c.t_head.num_samples = 16
  c.t_head.fc_dim = 16
  c.s_head.reg_dim = 16
  c.s_head.ohem_samples = 16
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return ml_collections.FrozenConfigDict(c)


def make_batch(config, num_boxes, seed=0):
  """B images with num_boxes[i] real gts (the rest padding), one crowd box."""
  rng = np.random.default_rng(seed)
  b, g = len(num_boxes), config.data.max_boxes
  xy = rng.uniform(0, 80, (b, g, 2))
  wh = rng.uniform(10, 60, (b, g, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, CANVAS - 1)], -1)
  mask = np.arange(g)[None] < np.array(num_boxes)[:, None]
  crowd = np.zeros((b, g), bool)
  if num_boxes[0] > 1:
    crowd[0, 0] = True
  return dict(
      image=jnp.asarray(rng.normal(size=(b, CANVAS, CANVAS, 3)), jnp.float32),
      image_size=jnp.array([[CANVAS, CANVAS]] + [[100, 120]] * (b - 1),
                           jnp.int32),
      boxes=jnp.asarray(np.where(mask[..., None], boxes, 0.0), jnp.float32),
      classes=jnp.asarray(np.where(mask, rng.integers(1, 4, (b, g)), 0),
                          jnp.int32),
      box_mask=jnp.asarray(mask),
      is_crowd=jnp.asarray(crowd))


def tiny_setup(**overrides):
  config = tiny_config(**overrides)
  model = TinyDetector(num_logits=4, feature_dim=16)
  params = tiny_params()
  return config, model, params


EXPECTED_AUX = {
    'loss_refine_cls', 'loss_refine_reg', 'loss_t_cls', 'loss_t_reg',
    'loss_s_cls', 'loss_s_reg', 'loss_mimic', 'loss_mimic_cls',
    'loss_mimic_reg', 'num_positives', 'proposal_recall', 'num_proposals',
    't_num_fg', 't_fg_iou', 's_num_fg', 's_fg_share', 'mimic_num_samples', 'mimic_cos_cls',
    'mimic_cos_reg', 't_reg_alive', 's_reg_alive'}


WEIGHTS = {'loss_weights.refine': 0.5, 'loss_weights.s_head': 2.0,
           'loss_weights.t_head': 3.0, 'mimic.weight': 0.25}


def _with_grads(loss_fn):
  """(loss, aux, grad of the loss, grad of the mimic term alone), one program.

  One compilation serves every default test (compiling is what costs here).
  """
  def term(p, batch, key, name):
    loss, aux = loss_fn(p, {}, batch, key)
    return loss if name == 'loss' else aux[name]

  def fn(params, batch, key):
    loss, aux = loss_fn(params, {}, batch, key)
    return (loss, aux, jax.grad(term)(params, batch, key, 'loss'),
            jax.grad(term)(params, batch, key, 'loss_mimic'))
  return jax.jit(fn)


@pytest.fixture(scope='module')
def tiny():
  config, model, params = tiny_setup(**WEIGHTS)
  return config, params, _with_grads(total.make_loss_fn(model, config))


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_compiles_once_finite_for_zero_and_max_boxes(tiny):
  config, params, step = tiny
  full = make_batch(config, [6, 6], seed=1)
  empty = make_batch(config, [0, 0], seed=2)
  loss_f, aux_f, grads_f, _ = step(params, full, jax.random.PRNGKey(0))
  loss_e, aux_e, grads_e, _ = step(params, empty, jax.random.PRNGKey(1))
  assert step._cache_size() == 1
  assert set(aux_f) == EXPECTED_AUX
  for aux in (aux_f, aux_e):
    assert all(np.isfinite(float(v)) for v in aux.values()), aux
  assert np.isfinite(float(loss_f)) and np.isfinite(float(loss_e))
  assert _finite(grads_f) and _finite(grads_e)
  # Without gts: no positives, no T-head foreground, zero regression terms.
  assert float(aux_e['num_positives']) == 0.0
  assert float(aux_e['t_num_fg']) == 0.0
  assert float(aux_e['loss_refine_reg']) == 0.0
  assert float(aux_e['loss_t_reg']) == 0.0
  # With gts: every non-crowd gt (11 over 2 images) has a refinement
  # positive; appended gts make T-head foreground with IoU 1 available.
  assert float(aux_f['num_positives']) >= 11 / 2
  assert float(aux_f['t_num_fg']) > 0
  assert 0.5 <= float(aux_f['t_fg_iou']) <= 1.0
  assert 0.0 <= float(aux_f['proposal_recall']) <= 1.0
  assert float(aux_f['num_proposals']) == config.proposals.num_proposals


def test_loss_is_weighted_sum_of_terms(tiny):
  config, params, step = tiny
  loss, aux, _, _ = step(params, make_batch(config, [3, 2]),
                         jax.random.PRNGKey(0))
  a = {k: float(v) for k, v in aux.items()}
  expected = (0.5 * (a['loss_refine_cls'] + a['loss_refine_reg']) +
              2.0 * (a['loss_s_cls'] + a['loss_s_reg']) +
              3.0 * (a['loss_t_cls'] + a['loss_t_reg']) +
              0.25 * (a['loss_mimic_cls'] + a['loss_mimic_reg']))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(a['loss_mimic'],
                             a['loss_mimic_cls'] + a['loss_mimic_reg'],
                             rtol=1e-5)


def test_same_key_same_loss_other_key_other_samples(tiny):
  config, params, step = tiny
  batch = make_batch(config, [4, 5], seed=3)
  l1 = step(params, batch, jax.random.PRNGKey(5))[0]
  l2 = step(params, batch, jax.random.PRNGKey(5))[0]
  l3 = step(params, batch, jax.random.PRNGKey(6))[0]
  assert float(l1) == float(l2)
  assert float(l1) != float(l3)


def test_uint8_pixels_are_normalised_inside_the_loss():
  """data.device_normalize: uint8 canvases give the loss of the host-
  normalised float32 images (NumPy reference, zero padding)."""
  config, model, params = tiny_setup()
  batch = make_batch(config, [3, 2], seed=4)
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, batch['image'].shape).astype(np.uint8)
  size = np.asarray(batch['image_size'])
  mean = np.asarray(config.data.pixel_mean, np.float32)
  inv_std = np.float32(1) / np.asarray(config.data.pixel_std, np.float32)
  host = (pixels.astype(np.float32) - mean) * inv_std
  for i, (h, w) in enumerate(size):
    host[i, h:] = 0
    host[i, :, w:] = 0
    pixels[i, h:] = 0  # the loader zero-pads the uint8 canvas too
    pixels[i, :, w:] = 0
  loss_fn = jax.jit(total.make_loss_fn(model, config))
  key = jax.random.PRNGKey(0)
  want, _ = loss_fn(params, {}, dict(batch, image=jnp.asarray(host)), key)
  got, _ = loss_fn(params, {}, dict(batch, image=jnp.asarray(pixels)), key)
  assert float(got) == float(want)


def test_gradients_reach_every_part_and_stopped_teacher(tiny):
  config, params, step = tiny
  _, _, grads, mimic_grads = step(params, make_batch(config, [6, 3], seed=4),
                                  jax.random.PRNGKey(0))
  for module in ('stem', 'refine', 's_cls', 's_reg', 's_delta', 't_fc',
                 't_cls', 't_delta'):
    assert np.abs(np.asarray(grads[module]['kernel'])).sum() > 0, module
  # mimic.teacher_grad='stopped': the mimic term moves the S-head only.
  for module in ('t_fc', 't_cls', 't_delta'):
    assert not np.asarray(mimic_grads[module]['kernel']).any(), module
  for module in ('s_cls', 's_reg', 'stem'):
    assert np.asarray(mimic_grads[module]['kernel']).any(), module


def test_mimic_off():
  config, model, params = tiny_setup(**{'mimic.enabled': False})
  batch = make_batch(config, [3, 1])
  loss, aux = jax.jit(total.make_loss_fn(model, config))(
      params, {}, batch, jax.random.PRNGKey(0))
  a = {k: float(v) for k, v in aux.items()}
  assert 'loss_mimic_cls' not in a and a['loss_mimic'] == 0.0
  np.testing.assert_allclose(
      float(loss), sum(a[k] for k in ('loss_refine_cls', 'loss_refine_reg',
                                      'loss_s_cls', 'loss_s_reg',
                                      'loss_t_cls', 'loss_t_reg')), rtol=1e-5)
  # The cosine diagnostic is still reported.
  assert -1.0 <= a['mimic_cos_reg'] <= 1.0


@pytest.mark.slow
def test_flowing_teacher_gets_mimic_gradient():
  config, model, params = tiny_setup(**{'mimic.teacher_grad': 'flowing'})
  step = _with_grads(total.make_loss_fn(model, config))
  _, _, _, mimic_grads = step(params, make_batch(config, [4, 4], seed=5),
                              jax.random.PRNGKey(0))
  for module in ('t_fc', 't_cls'):
    assert np.asarray(mimic_grads[module]['kernel']).any(), module


@pytest.mark.slow
def test_other_variants_finite():
  # KL on the cls path only, foreground samples, focal refinement.
  config, model, params = tiny_setup(**{
      'mimic.cls_distance': 'kl', 'mimic.paths': 'cls',
      'mimic.samples': 'foreground', 'mimic.temperature': 2.0,
      'refine.cls_loss': 'focal'})
  loss, aux = jax.jit(total.make_loss_fn(model, config))(
      params, {}, make_batch(config, [3, 1]), jax.random.PRNGKey(0))
  assert 'loss_mimic_reg' not in aux and float(aux['loss_mimic_cls']) > 0
  assert np.isfinite(float(loss))


# ----------------------------------------------------------- real MimicDet


def demo_setup():
  from mimicdet_jax.models.mimicdet import MimicDet  # pylint: disable=g-import-not-at-top
  c = configs.demo.get_config()
  c.model.num_classes = 3
  c.s_head.num_logits = 4
  c.data.canvas_buckets = ((CANVAS, CANVAS),)
  config = ml_collections.FrozenConfigDict(c)
  model = MimicDet(config)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), jnp.zeros((1, CANVAS, CANVAS, 3)))
  return config, model, variables


@pytest.mark.slow
def test_demo_config_compiles_once_finite_loss_and_grad():
  config, model, variables = demo_setup()
  params, frozen = variables['params'], variables.get('frozen', {})
  loss_fn = total.make_loss_fn(model, config)
  full = make_batch(config, [config.data.max_boxes] * 2, seed=1)
  empty = make_batch(config, [0, 0], seed=2)
  jitted = jax.jit(loss_fn)
  for batch, key in ((full, 0), (empty, 1)):
    loss, aux = jitted(params, frozen, batch, jax.random.PRNGKey(key))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for v in aux.values()), aux
  assert jitted._cache_size() == 1

  def term(p, b, name):
    loss, aux = loss_fn(p, frozen, b, jax.random.PRNGKey(0))
    return loss if name == 'loss' else aux[name]

  grad_fn = jax.jit(lambda p, b: (jax.grad(term)(p, b, 'loss'),
                                  jax.grad(term)(p, b, 'loss_mimic')))
  for batch in (full, empty):
    grads, mimic_grads = grad_fn(params, batch)
    assert all(np.isfinite(np.asarray(g)).all()
               for g in jax.tree_util.tree_leaves(grads))
    # Stopped teacher: the mimic term leaves the T-head alone but reaches
    # the S-head.
    assert not any(np.asarray(g).any() for g in
                   jax.tree_util.tree_leaves(mimic_grads['t_head_net']))
    assert any(np.asarray(g).any() for g in
               jax.tree_util.tree_leaves(mimic_grads['s_head_net']))


@pytest.mark.slow
def test_demo_config_200_steps_lower_every_loss_term():
  config, model, variables = demo_setup()
  params, frozen = variables['params'], variables.get('frozen', {})
  loss_fn = total.make_loss_fn(model, config)
  batches = [make_batch(config, [4, 3], seed=s) for s in range(2)]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, frozen, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  terms = ('loss_refine_cls', 'loss_refine_reg', 'loss_t_cls', 'loss_t_reg',
           'loss_s_cls', 'loss_s_reg', 'loss_mimic')
  history = []
  for i in range(200):
    params, opt_state, aux = step(params, opt_state, batches[i % 2],
                                  jax.random.PRNGKey(i))
    history.append({k: float(aux[k]) for k in terms})
  for k in terms:
    first = np.mean([h[k] for h in history[:10]])
    last = np.mean([h[k] for h in history[-10:]])
    assert last < first, (k, first, last)


@pytest.mark.slow
def test_s_head_at_its_samples_equals_the_dense_s_head_read_there():
  from mimicdet_jax.models.mimicdet import MimicDet  # pylint: disable=g-import-not-at-top
  """s_head.sparse_train (MimicDet.s_head_at, the default): the loss, every
  aux term and every gradient equal those of the dense S-head read at the
  same positions (the dense deformable conv is the one checked against
  torchvision, tests/test_ops_deform_conv.py)."""
  config, model, variables = demo_setup()
  assert config.s_head.sparse_train
  dense_config = config.to_dict()
  dense_config['s_head']['sparse_train'] = False
  dense_config = ml_collections.FrozenConfigDict(dense_config)
  params, frozen = variables['params'], variables.get('frozen', {})
  batch = make_batch(config, [config.data.max_boxes, 3], seed=1)

  def loss_and_grads(cfg):
    fn = total.make_loss_fn(MimicDet(cfg), cfg)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(
        params, frozen, batch, jax.random.PRNGKey(0))

  (loss, aux), grads = loss_and_grads(config)
  (dense_loss, dense_aux), dense_grads = loss_and_grads(dense_config)
  np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)
  for k in aux:
    np.testing.assert_allclose(aux[k], dense_aux[k], rtol=1e-4, atol=1e-6,
                               err_msg=k)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  dense_flat = dict(jax.tree_util.tree_leaves_with_path(dense_grads))
  for path, g in flat:
    d = np.asarray(dense_flat[path])
    np.testing.assert_allclose(g, d, rtol=2e-4, atol=2e-6 * np.abs(d).max(),
                               err_msg=jax.tree_util.keystr(path))
