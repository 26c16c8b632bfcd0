r"""Where the bytes of the train step go, part by part: each part of the step
compiled on its own for one TPU chip, forward and backward, at the step's
shapes. Compiler figures, not measured times (docs/BENCHMARKS.md, "TPU,
compiled on CPU", "Part by part").

  python benchmarks/tpu_parts.py configs.mimicdet_r50_fpn_1x v5p:1x1x1 2 OUT \
      [key=value ...] [--parts backbone,fpn,...]

(config overrides before --parts). With LIBTPU_INIT_ARGS=--xla_msa_enable=false
the same parts compile without memory-space assignment: no HBM<->VMEM
copies, whose bytes the cost analysis counts on top of their consumers'
(docs/BENCHMARKS.md, "What bytes accessed counts").

The parts, each a jitted function of abstract arguments (nothing is
materialised), with the per-chip batch of the step (`per_chip` images):
  backbone   ResNet forward + its vjp (cotangents for C2..C5 as arguments)
  fpn        FPN forward + vjp (w.r.t. its params and C2..C5)
  refinement refinement module on the S-head's levels, forward + vjp
  forward    backbone + FPN + refinement in one program, forward + vjp: the
             step's `StagedLoss.forward` (compare with the sum of the three)
  proposals  top-k + NMS per image (no gradient)
  t_head     RoIAlign + fcs on t_head.num_samples boxes per image, + vjp
  s_head     the S-head at proposals + T-head samples (`s_head_at`), + vjp
  losses     the step's per-image `StagedLoss.losses` (vmapped as in the
             step: proposals, samplers, targets, T-head, S-head, mimic,
             losses) and its gradient w.r.t. params and the network outputs;
             losses minus proposals, t_head and s_head = targets + loss terms
  update     AdamW update, apply, the non-finite keep and the EMA
Writes OUT.json: one row per part (compile seconds, per-chip memory, flops,
bytes accessed, the same without MSA copies, optimal_seconds) and
OUT.<part>.opt.txt (optimized HLO).
"""
import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
from mimicdet_jax.losses import total  # pylint: disable=g-import-not-at-top
from mimicdet_jax.models import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top
from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import plan_tpu  # pylint: disable=g-import-not-at-top
from mimicdet_jax.training import ema as ema_lib  # pylint: disable=g-import-not-at-top
from mimicdet_jax.training import optim  # pylint: disable=g-import-not-at-top

PARTS = ('backbone', 'fpn', 'refinement', 'forward', 'proposals', 't_head',
         's_head', 'losses', 'update')


def build_parts(config, device, canvas, per_chip):
  """{part: (jitted fn, abstract args)} on one chip."""
  one = jax.sharding.SingleDeviceSharding(device)
  shaped = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
  c = config
  model = mimicdet.MimicDet(c)
  h, w = canvas
  b = per_chip
  variables = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, h, w, 3)), train=False),
      jax.random.PRNGKey(0))
  params, frozen = variables['params'], variables.get('frozen', {})
  images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)

  def sub(name):
    return ({'params': {name: params[name]}} |
            ({'frozen': {name: frozen[name]}} if name in frozen else {}))

  def vjp_program(name, method, inputs):
    """Forward + backward of submodule `name` (run as `method(module,
    *inputs)` with only its variables) w.r.t. its params and its floating
    inputs, the cotangents as arguments."""
    def f(p, fr, *xs):
      v = {'params': {name: p}} | ({'frozen': {name: fr}} if fr else {})
      return model.apply(v, *xs, method=method)
    fr = frozen.get(name, {})
    out = jax.eval_shape(f, params[name], fr, *inputs)
    # An input is differentiated when its (first) leaf is floating.
    float_in = [jnp.issubdtype(jax.tree.leaves(x)[0].dtype, jnp.floating)
                for x in inputs]

    def program(p, fr, xs, cot):
      def g(p, *fx):
        it = iter(fx)
        return f(p, fr, *[next(it) if fl else x
                          for x, fl in zip(xs, float_in)])
      primals = [x for x, fl in zip(xs, float_in) if fl]
      y, pullback = jax.vjp(g, p, *primals)
      return y, pullback(cot)

    return jax.jit(program), shaped((params[name], fr, tuple(inputs), out))

  parts = {}
  c2 = jax.eval_shape(lambda v, x: model.apply(
      v, x, method=lambda m, x: m.backbone(x, train=True)),
      sub('backbone'), images)
  parts['backbone'] = vjp_program(
      'backbone', lambda m, x: m.backbone(x, train=True), [images])
  pyramid = jax.eval_shape(lambda v, f: model.apply(
      v, f, method=lambda m, f: m.fpn(f)), sub('fpn'), c2)
  parts['fpn'] = vjp_program('fpn', lambda m, f: m.fpn(f), [c2])
  s_levels = tuple(c.model.s_levels)
  s_features = {l: pyramid[l] for l in s_levels}
  parts['refinement'] = vjp_program(
      'refinement', lambda m, f: m.refinement(f), [s_features])

  staged = total.make_loss_fn(model, c)
  batch = dict(
      image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
      image_size=jax.ShapeDtypeStruct((b, 2), jnp.int32),
      boxes=jax.ShapeDtypeStruct((b, c.data.max_boxes, 4), jnp.float32),
      classes=jax.ShapeDtypeStruct((b, c.data.max_boxes), jnp.int32),
      box_mask=jax.ShapeDtypeStruct((b, c.data.max_boxes), jnp.bool_),
      is_crowd=jax.ShapeDtypeStruct((b, c.data.max_boxes), jnp.bool_))
  outputs = jax.eval_shape(staged.forward, params, frozen, batch)

  def forward(p, fr, bt, cot):
    y, pullback = jax.vjp(lambda p: staged.forward(p, fr, bt), p)
    return y, pullback(cot)
  parts['forward'] = (jax.jit(forward),
                      shaped((params, frozen, batch, outputs)))

  anchors = anchors_lib.dense_anchors(canvas, s_levels, c.model.anchor_scale)

  def proposals(refine_logits, refine_deltas, image_size):
    return total.proposals(dict(refine_logits=refine_logits,
                                refine_deltas=refine_deltas), anchors,
                           image_size, canvas, c)
  parts['proposals'] = (jax.jit(proposals), shaped((
      outputs['refine_logits'], outputs['refine_deltas'],
      batch['image_size'])))

  s = c.t_head.num_samples
  t_features = outputs['t_features']
  boxes = jax.ShapeDtypeStruct((b, s, 4), jnp.float32)
  box_levels = jax.ShapeDtypeStruct((b, s), jnp.int32)
  parts['t_head'] = vjp_program(
      't_head_net', lambda m, f, bx, lv: m.t_head(f, bx, lv),
      [t_features, boxes, box_levels])
  if 's_features' in outputs:
    origins = jax.ShapeDtypeStruct((b, c.proposals.num_proposals + s),
                                   jnp.int32)
    parts['s_head'] = vjp_program(
        's_head_net', lambda m, f, d, o: m.s_head_at(f, d, o),
        [outputs['s_features'], outputs['refine_deltas'], origins])

  def losses(p, fr, out, bt, keys):
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)
    def mean_loss(p, out):
      l, aux = jax.vmap(lambda o, e, k: staged.losses(p, fr, one(o), one(e), k))(
          out, bt, keys)
      return jnp.mean(l), jax.tree.map(jnp.mean, aux)
    return jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(p, out)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), b))
  parts['losses'] = (jax.jit(losses),
                     shaped((params, frozen, outputs, batch, keys)))

  frozen_mask = backbones.frozen_param_mask(
      params, c.model.backbone.frozen_stages)
  tx = optim.make_optimizer(c, frozen_mask)
  opt_state = jax.eval_shape(tx.init, params)

  def update(p, opt, ema, grads, count):
    updates, new_opt = tx.update(grads, opt, p)
    new_p = optax.apply_updates(p, updates)
    finite = jnp.isfinite(optax.global_norm(grads))
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)
    new_ema = ema_lib.update_ema(ema, new_p, count, c.optim.ema_decay,
                                 c.optim.ema_warmup)
    return keep(new_p, p), keep(new_opt, opt), keep(new_ema, ema)
  ema = params if c.optim.ema_decay > 0 else None
  parts['update'] = (jax.jit(update), shaped((
      params, opt_state, ema, params,
      jax.ShapeDtypeStruct((), jnp.int32))))
  return parts


def load_config(module: str, overrides):
  """(config, number of classes) of config module `module` (dotted) with
  `key=value` overrides; a data set's own class count is taken as COCO's 80."""
  raw = importlib.import_module(module).get_config()
  for override in overrides:
    key, value = override.split('=', 1)
    config_lib.set_key(raw, key, config_lib.parse_value(
        value, config_lib.get_key(raw, key)))
  return raw, 80 if raw.data.num_classes == -1 else raw.data.num_classes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config_module')
  parser.add_argument('topology')
  parser.add_argument('per_chip', type=int)
  parser.add_argument('out')
  parser.add_argument('--parts', default=','.join(PARTS))
  parser.add_argument('overrides', nargs='*')
  args = parser.parse_args()
  devices = aot.topology_devices(args.topology)
  raw, num_classes = load_config(args.config_module, args.overrides)
  config = aot.resolve_for(raw, num_classes, args.per_chip)
  canvas = plan_tpu.pick_canvas(config, 'first')  # lsj: its one canvas
  parts = build_parts(config, devices[0], canvas, args.per_chip)
  rows = {}
  if os.path.exists(args.out + '.json'):
    with open(args.out + '.json') as f:
      rows = json.load(f)
  for name in args.parts.split(','):
    if name not in parts:
      print(f'{name}: not in this config ({sorted(parts)})')
      continue
    fn, fn_args = parts[name]
    start = time.time()
    compiled = fn.lower(*fn_args).compile()
    seconds = time.time() - start
    text = compiled.as_text()
    with open(f'{args.out}.{name}.opt.txt', 'w') as f:
      f.write(text)
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    rows[name] = dict(
        compile_s=round(seconds, 1), canvas=canvas, per_chip=args.per_chip,
        topology=args.topology, overrides=args.overrides,
        arg=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
        temp=memory.temp_size_in_bytes, flops=cost.get('flops'),
        bytes=cost.get('bytes accessed'),
        # aot.Compiled.bytes_without_copies: the count less its MSA copies.
        bytes_without_copies=cost.get('bytes accessed') - aot.COPY_COUNT *
        aot.memory_space_copy_bytes(text),
        optimal=cost.get('optimal_seconds'))
    print(name, json.dumps(rows[name]), flush=True)
    with open(args.out + '.json', 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
