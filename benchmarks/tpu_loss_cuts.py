r"""Cuts of the per-image losses stage compiled for one TPU chip: which
part has no cost model (docs/BENCHMARKS.md, "TPU, compiled on CPU").
Compiler figures, not measured times.

  python benchmarks/tpu_loss_cuts.py CUT fwd|grad [OUT.opt.txt]
  # CUT: refine | proposals | proposals_sg | t_head_cls | t_head_reg |
  #      t_head_sum | t_head | s_sampling | s_head | all
  # env: OVR="key=value ..." config overrides; NOVMAP=1 the losses on the
  #      batch instead of vmapped per image

The demo config, 2 images on v5p:1x1x1, the losses stage of
`losses.total.make_loss_fn` returned after stage CUT, vmapped over the
images as training/step.py does; prints optimal_seconds and bytes.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from configs import demo  # pylint: disable=g-import-not-at-top
from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
from mimicdet_jax.losses import total as T  # pylint: disable=g-import-not-at-top
from mimicdet_jax.models import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top

cut = sys.argv[1]
grad = sys.argv[2] == 'grad'
dev = aot.topology_devices('v5p:1x1x1')[0]
one = jax.sharding.SingleDeviceSharding(dev)
raw = demo.get_config()
for kv in os.environ.get('OVR', '').split():
  key, value = kv.split('=', 1)
  config_lib.set_key(raw, key, config_lib.parse_value(
      value, config_lib.get_key(raw, key)))
c = aot.resolve_for(raw, 6, 2)
model = mimicdet.MimicDet(c)
h, w = c.data.canvas_buckets[0]
b = 2
variables = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, h, w, 3)), train=False), jax.random.PRNGKey(0))
params, frozen = variables['params'], variables.get('frozen', {})
G = c.data.max_boxes
batch = dict(image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8), image_size=jax.ShapeDtypeStruct((b, 2), jnp.int32),
  boxes=jax.ShapeDtypeStruct((b, G, 4), jnp.float32), classes=jax.ShapeDtypeStruct((b, G), jnp.int32),
  box_mask=jax.ShapeDtypeStruct((b, G), jnp.bool_), is_crowd=jax.ShapeDtypeStruct((b, G), jnp.bool_))
staged = T.make_loss_fn(model, c)
outputs = jax.eval_shape(staged.forward, params, frozen, batch)
sparse = 's_features' in outputs

def losses(params, frozen, outputs, batch, rng):
  variables = {'params': params, 'frozen': frozen}
  canvas = batch['image'].shape[1:3]
  anchors = anchors_lib.dense_anchors(canvas, tuple(c.model.s_levels), c.model.anchor_scale)
  gts = T.ground_truth(batch)
  refine_key, t_key = jax.random.split(rng)
  refine, refine_targets = T.refinement_loss(outputs, anchors, gts, refine_key, c)
  loss = refine['cls'] + refine['reg']
  if cut == 'refine': return loss
  proposal_set = T.proposals(outputs, anchors, batch['image_size'], canvas, c)
  if cut == 'proposals': return loss + jnp.sum(proposal_set['boxes'])
  if cut == 'proposals_sg':
    return loss + jnp.sum(jax.lax.stop_gradient(proposal_set['boxes']))
  t_samples, teacher_out, t_head = T.t_head_loss(model, variables, outputs, anchors['level'], proposal_set, gts, refine_targets['gt_origin'], t_key, c)
  if cut == 't_head_cls': return t_head['cls']
  if cut == 't_head_reg': return t_head['reg']
  if cut == 't_head_sum': return jnp.sum(teacher_out['cls_logits']) + jnp.sum(teacher_out['reg_feature'])
  if cut == 't_head_sum_nor': return jnp.sum(teacher_out['cls_logits'])
  loss = loss + t_head['cls'] + t_head['reg']
  if cut == 't_head': return loss
  s_targets, s_sampled = T.s_head_sampling(proposal_set, gts, rng, c)
  if cut == 's_sampling': return loss + jnp.sum(s_targets['delta_targets'])
  s_at_proposals, s_at_samples = T.s_head_at_positions(model, variables, outputs, proposal_set['origin'], t_samples['origin'], sparse_s_head=sparse)
  s_head = T.s_head_loss(s_at_proposals, proposal_set, s_targets, s_sampled, c)
  loss = loss + s_head['cls'] + s_head['reg']
  if cut == 's_head': return loss
  student = dict(cls=s_at_samples['s_cls_logits'], reg=s_at_samples['s_reg_feature'])
  teacher = dict(cls=teacher_out['cls_logits'], reg=teacher_out['reg_feature'])
  mimic_loss, _, _ = T.mimic(student, teacher, t_samples, c)
  return loss + mimic_loss

def per_image(params, frozen, outputs, batch, keys):
  o = lambda t: jax.tree.map(lambda x: x[None], t)
  if os.environ.get('NOVMAP'):
    return losses(params, frozen, outputs, batch, keys[0])
  return jnp.mean(jax.vmap(lambda out, e, k: losses(params, frozen, o(out), o(e), k))(outputs, batch, keys))

fn = jax.grad(per_image, argnums=(0, 2)) if grad else per_image
keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), b))
sh = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), t)
t0 = time.time()
comp = jax.jit(fn).lower(*sh((params, frozen, outputs, batch, keys))).compile()
cost = comp.cost_analysis()
print(json.dumps(dict(cut=cut, grad=grad, novmap=bool(os.environ.get('NOVMAP')), s=round(time.time()-t0,1), optimal=cost.get('optimal_seconds'), bytes=cost.get('bytes accessed'))), flush=True)
if len(sys.argv) > 3: open(sys.argv[3], 'w').write(comp.as_text())
