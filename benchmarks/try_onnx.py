r"""ONNX export attempt: jax2onnx on the exported detector function, then on
its parts, each checked with onnxruntime against JAX.

  pip install jax2onnx onnxruntime onnx   # extras, not in requirements.txt
  python benchmarks/try_onnx.py [--canvas 128] [--batch 2] [--timeout 300]

The function is `serving.export.detector_function` (the jax.export artifact's
function: uint8 canvases + image sizes -> boxes, scores, classes,
num_detections, NMS inside) on a tiny numpy-initialised model
(tests/eval_helper.tiny_config, benchmarks/common.init_variables 'numpy').
Then the parts, each converted on its own with the JAX intermediates as
inputs: backbone + FPN, the refinement module, one deformable conv (the
S-head's finest level, offsets from the model; also through the row-chunked
lax.map path that large canvases take), the S-head, the dense network
(model.apply), the top-k of positions, box decoding, NMS as the detector runs
it (select_detections, vmapped over the batch), NMS of one image without the
vmap (ops.batched_nms; a diagnostic, not part of the detector) and the whole
post-processing. For a part that converts, onnxruntime runs it
on the same inputs and the table gives the max abs difference to JAX (integer
and bool outputs: the number of differing entries). For one that does not,
the table names the JAX primitive jax2onnx stopped at and where in
mimicdet_jax it comes from (the equation being lowered when it raised).
When the whole detector converts, its ONNX detections are also compared with
the loader's (`Detector.load` of an `export_detector` directory).

Exits 0 with a message when jax2onnx or onnxruntime is missing.
"""
import argparse
import os
import signal
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'mimicdet_jax') + os.sep


def _missing_extras():
  missing = []
  for name in ('jax2onnx', 'onnxruntime', 'onnx'):
    try:
      __import__(name)
    except ImportError:
      missing.append(name)
  return missing


class _Timeout(Exception):
  pass


def _on_alarm(signum, frame):  # pylint: disable=unused-argument
  raise _Timeout()


def tiny_setup(canvas: int):
  """(resolved tiny config, variables without the T-head, categories)."""
  from benchmarks import common as bench
  from mimicdet_jax import config_lib
  from mimicdet_jax.data import synthetic
  from mimicdet_jax.models import mimicdet
  from mimicdet_jax.serving import export
  from tests import eval_helper
  recipe = eval_helper.tiny_config('/nonexistent')
  recipe.data.min_size = recipe.data.max_size = canvas
  recipe.data.train_min_sizes = (canvas,)
  recipe.data.canvas_buckets = ((canvas, canvas),)
  config = config_lib.resolve(recipe, len(synthetic.CATEGORIES))
  config = export.s_head_config(config)
  variables = bench.init_variables(config, mimicdet.MimicDet(config), 'numpy')
  categories = [dict(id=int(c['id']), name=str(c['name']))
                for c in synthetic.CATEGORIES]
  return config, export.s_head_variables(variables), categories


def _user_frame(source_info) -> str:
  """file:line (function) of the innermost mimicdet_jax frame, else the
  innermost user frame."""
  from jax._src import source_info_util
  tb = getattr(source_info, 'traceback', None)
  if tb is None:
    return '?'
  for f in source_info_util.user_frames(tb):  # innermost first
    if f.file_name.startswith(PKG):
      return (f'{os.path.relpath(f.file_name, ROOT)}:{f.start_line} '
              f'({f.function_name})')
  frame = source_info_util.user_frame(tb)
  if frame is None:
    return '?'
  return f'{os.path.relpath(frame.file_name, ROOT)}:{frame.start_line}'


def _failing_eqn(exc):
  """The innermost jaxpr equation being lowered when `exc` was raised (a
  plugin lowering a sub-jaxpr, e.g. jit's, holds its current one as a local
  of its own frame)."""
  from jax._src import core
  eqn = None
  tb = exc.__traceback__
  while tb is not None:
    local = tb.tb_frame.f_locals
    found = [v for k, v in sorted(local.items(), key=lambda kv: kv[0] != 'inner_eqn')
             if isinstance(v, core.JaxprEqn)]
    if found:
      eqn = found[0]
    tb = tb.tb_next
  return eqn


def _unregistered(fn, args):
  """{primitive: first mimicdet_jax frame} of the equations (sub-jaxprs
  included) for which jax2onnx has no plugin at all."""
  import jax
  from jax._src import core
  from jax2onnx.plugins import plugin_system
  plugin_system.import_all_plugins()
  registry = plugin_system.PLUGIN_REGISTRY
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name not in registry and name not in found:
        found[name] = _user_frame(eqn.source_info)
      for sub in core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _compare(got, want):
  import numpy as np
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape:
    return f'shape {got.shape} vs {want.shape}'
  if np.issubdtype(want.dtype, np.floating):
    if not want.size:
      return '0'
    return f'{float(np.max(np.abs(got.astype(np.float64) - want))):.2e}'
  differ = f'{int(np.sum(got != want))} differ'
  if want.dtype == bool:
    differ += f' ({int(want.sum())} true)'
  return differ


def try_part(name, fn, args, timeout):
  """Converts fn(*args) (tuple of arrays out), runs it with onnxruntime.

  Returns a row dict: part, converted, blocking, where, diff, seconds,
  and the ORT outputs (or None).
  """
  import jax
  import numpy as np
  import onnxruntime as ort
  from jax2onnx import to_onnx
  row = dict(part=name, converted='no', blocking='', where='', diff='',
             seconds='', ort=None)
  jax.clear_caches()
  want = [np.asarray(a) for a in jax.tree.leaves(jax.jit(fn)(*args))]
  # Traced fresh: jax2onnx patches jnp functions while it traces, which a
  # jit body cached by the reference run above would bypass.
  jax.clear_caches()
  start = time.time()
  signal.alarm(timeout)
  try:
    model = to_onnx(fn, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args],
                    model_name=name.replace(' ', '_').replace('+', '_'))
    signal.alarm(0)
  except _Timeout:
    jax.clear_caches()
    row.update(converted=f'hangs (>{timeout} s)')
    return row
  except Exception as exc:  # pylint: disable=broad-except
    signal.alarm(0)
    # A failed conversion leaves jit bodies traced with jax2onnx's patched
    # primitives in JAX's caches; later JAX runs must not reuse them.
    jax.clear_caches()
    row['seconds'] = f'{time.time() - start:.0f}'
    eqn = _failing_eqn(exc)
    missing = {}
    try:
      missing = _unregistered(fn, args)
    except Exception:  # pylint: disable=broad-except
      pass
    message = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'
    if eqn is not None:
      row.update(blocking=eqn.primitive.name, where=_user_frame(eqn.source_info))
    elif missing:
      prim, where = next(iter(missing.items()))
      row.update(blocking=prim, where=where)
    row['error'] = message[:1200]
    row['missing'] = missing
    row['traceback'] = ''.join(traceback.format_exception(exc))[-3000:]
    return row
  row['seconds'] = f'{time.time() - start:.0f}'
  row['converted'] = 'yes'
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1
  options.inter_op_num_threads = 1
  try:
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    feeds = {i.name: np.asarray(a) for i, a in zip(session.get_inputs(), args)}
    got = session.run(None, feeds)
  except Exception as exc:  # pylint: disable=broad-except
    row['diff'] = 'onnxruntime failed'
    row['error'] = f'{type(exc).__name__}: {str(exc)[:300]}'
    row['traceback'] = ''.join(traceback.format_exception(exc))[-3000:]
    return row
  if len(got) != len(want):
    row['diff'] = f'{len(got)} outputs vs {len(want)}'
  else:
    row['diff'] = ', '.join(_compare(g, w) for g, w in zip(got, want))
  row['ort'] = got
  return row


def build_parts(config, variables, categories, batch, canvas):
  """[(name, fn, args)]: the whole detector first, then its parts."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mimicdet_jax import ops
  from mimicdet_jax.data import transforms
  from mimicdet_jax.evaluation import postprocess
  from mimicdet_jax.models import anchors as anchors_lib
  from mimicdet_jax.models import mimicdet
  from mimicdet_jax.serving import export

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, canvas, canvas, 3), np.uint8)
  sizes = np.array([[canvas, canvas]] + [[canvas * 3 // 4, canvas * 5 // 8]] *
                   (batch - 1), np.int32)
  images[1:, canvas * 3 // 4:] = 0
  images[1:, :, canvas * 5 // 8:] = 0
  model = mimicdet.MimicDet(config)
  s_levels = tuple(config.model.s_levels)
  anchors = anchors_lib.dense_anchors((canvas, canvas), s_levels,
                                      config.model.anchor_scale)
  anchor_boxes = np.asarray(anchors['boxes'], np.float32)

  detector = export.detector_function(config, variables, categories)

  def whole(images, image_sizes):
    d = detector(images, image_sizes)
    return d['boxes'], d['scores'], d['classes'], d['num_detections']

  x = np.asarray(jax.jit(
      lambda i, s: transforms.normalize_on_device(i, s, config.data))(
          images, sizes))

  def backbone_fpn(x):
    pyramid = model.apply(variables, x,
                          method=lambda m, x: m.fpn(m.backbone(x)))
    return tuple(pyramid[l] for l in s_levels)

  s_feats = [np.asarray(a) for a in jax.jit(backbone_fpn)(x)]

  def refinement(*feats):
    out = model.apply(variables, dict(zip(s_levels, feats)),
                      method=lambda m, f: m.refinement(f))
    return tuple(v for l in s_levels for v in out[l])

  ref = [np.asarray(a) for a in jax.jit(refinement)(*s_feats)]
  deltas = ref[1::2]

  def s_head(*args):
    n = len(s_levels)
    out = model.apply(variables, dict(zip(s_levels, args[:n])),
                      dict(zip(s_levels, args[n:])),
                      method=lambda m, f, d: m.s_head_net(f, d))
    return tuple(v for l in s_levels for v in out[l])

  # One deformable conv: the finest level's guided conv, its offsets from
  # the offset net on the refinement deltas (as GuidedConv computes them).
  finest = min(s_levels)
  head_params = variables['params']['s_head_net'][f'p{finest}_conv']
  kernel = np.asarray(head_params['kernel'])
  k = kernel.shape[0]
  _, inter = model.apply(variables, dict(zip(s_levels, s_feats)),
                         dict(zip(s_levels, deltas)),
                         method=lambda m, f, d: m.s_head_net(f, d),
                         mutable=['intermediates'])
  offsets = np.asarray(
      inter['intermediates']['s_head_net'][f'p{finest}_conv']['offsets'][0])
  # Zero-initialised last offset layer -> zero offsets; add a fixed random
  # field so the bilinear sampling is exercised at fractional positions.
  offsets = offsets + rng.normal(0, 1.5, offsets.shape).astype(np.float32)

  def deform(x, offsets):
    return (ops.deform_conv2d(x, offsets, jnp.asarray(kernel), stride=1,
                              padding=k // 2),)

  # The same conv through the row-chunked path (lax.map of jax.checkpoint'ed
  # chunks) that large canvases take (COCO recipes), forced by a small bound.
  chunk_bound = s_feats[0].shape[0] * s_feats[0].shape[2] * k * k * \
      s_feats[0].shape[3] * 4 * 4  # 4 output rows per chunk

  def deform_chunked(x, offsets):
    return (ops.deform_conv2d(x, offsets, jnp.asarray(kernel), stride=1,
                              padding=k // 2,
                              max_gather_elements=chunk_bound),)

  def dense(x):
    out = model.apply(variables, x, train=False)
    return (out['refine_logits'], out['refine_deltas'], out['s_cls_logits'],
            out['s_deltas'])

  dense_out = [np.asarray(a) for a in jax.jit(dense)(x)]

  def topk(refine_logits, image_size):
    idx, obj = postprocess.inference_positions(refine_logits, anchor_boxes,
                                               image_size, config)
    return idx, obj

  idx, _ = [np.asarray(a) for a in jax.jit(topk)(dense_out[0], sizes)]
  gathered_deltas = np.take_along_axis(dense_out[1], idx[..., None], axis=1)
  gathered_anchors = anchor_boxes[idx]

  def decode(deltas, boxes, image_size):
    out = ops.decode_deltas(deltas, boxes, config.refine.stds,
                            scale_clip=config.box.scale_clip)
    return (ops.clip_boxes(out, image_size),)

  def post(refine_logits, refine_deltas, s_cls_logits, s_deltas, image_size):
    d = postprocess.postprocess(
        dict(refine_logits=refine_logits, refine_deltas=refine_deltas,
             s_cls_logits=s_cls_logits, s_deltas=s_deltas),
        anchor_boxes, image_size, config)
    return d['boxes'], d['scores'], d['classes'], d['valid']

  # NMS input: the boxes and probabilities postprocess hands to it.
  def nms_inputs(refine_logits, refine_deltas, s_cls_logits, s_deltas,
                 image_size):
    idx, obj = postprocess.inference_positions(refine_logits, anchor_boxes,
                                               image_size, config)
    refined = ops.clip_boxes(ops.decode_deltas(
        mimicdet.gather_at(refine_deltas, idx), jnp.asarray(anchor_boxes)[idx],
        config.refine.stds, scale_clip=config.box.scale_clip), image_size)
    boxes = ops.clip_boxes(ops.decode_deltas(
        mimicdet.gather_at(s_deltas, idx), refined, config.s_head.stds,
        scale_clip=config.box.scale_clip), image_size)
    probs = postprocess.class_probs(mimicdet.gather_at(s_cls_logits, idx))
    if config.eval.score_times_objectness:
      probs = probs * obj[..., None]
    return boxes, jnp.where(obj[..., None] > 0, probs, 0.0)

  nms_boxes, nms_probs = [np.asarray(a) for a in
                          jax.jit(nms_inputs)(*dense_out, sizes)]
  ev = config.eval

  def nms(boxes, probs):
    d = postprocess.select_detections(
        boxes, probs, score_threshold=ev.score_threshold,
        nms_threshold=ev.nms_threshold, max_detections=ev.max_detections)
    return d['boxes'], d['scores'], d['classes'], d['valid']

  def nms_one_image(boxes, scores, classes, valid):
    keep, keep_valid = ops.batched_nms(boxes, scores, classes,
                                       ev.nms_threshold,
                                       max_output_size=ev.max_detections,
                                       valid=valid)
    return keep, keep_valid

  # select_detections' candidates of image 0, for NMS without the vmap.
  n, num_classes = nms_probs.shape[1:]
  box_idx = np.arange(n * num_classes) // num_classes
  one_scores = nms_probs[0].reshape(-1)
  one_boxes = nms_boxes[0][box_idx]
  one_classes = (np.arange(n * num_classes) % num_classes + 1).astype(np.int32)
  area = ((one_boxes[:, 2] - one_boxes[:, 0]) *
          (one_boxes[:, 3] - one_boxes[:, 1]))
  one_valid = (one_scores >= ev.score_threshold) & (area > 0)

  return dict(images=images, sizes=sizes), [
      ('whole detector', whole, (images, sizes)),
      ('backbone+FPN', backbone_fpn, (x,)),
      ('refinement module', refinement, tuple(s_feats)),
      (f'deform_conv2d (P{finest}, {k}x{k})', deform, (s_feats[0], offsets)),
      (f'deform_conv2d (P{finest}, row chunks: lax.map path)', deform_chunked,
       (s_feats[0], offsets)),
      ('S-head', s_head, tuple(s_feats) + tuple(deltas)),
      ('dense network (model.apply)', dense, (x,)),
      ('top-k positions', topk, (dense_out[0], sizes)),
      ('box decoding', decode, (gathered_deltas, gathered_anchors, sizes)),
      ('NMS (select_detections)', nms, (nms_boxes, nms_probs)),
      ('NMS of one image (ops.batched_nms, no vmap; diagnostic)',
       nms_one_image, (one_boxes, one_scores, one_classes, one_valid)),
      ('post-processing', post, tuple(dense_out) + (sizes,)),
  ]


def compare_with_loader(config, variables, categories, inputs, ort_out):
  """ONNX detections of the whole detector against Detector.load's."""
  import numpy as np
  from mimicdet_jax.serving import detector as detector_lib
  from mimicdet_jax.serving import export
  with tempfile.TemporaryDirectory() as out:
    export.export_detector(config, variables, categories, out,
                           platforms=('cpu',))
    dets = detector_lib.Detector.load(out).detect_canvas(inputs['images'],
                                                          inputs['sizes'])
  boxes, scores, classes, num = [np.asarray(a) for a in ort_out]
  return dict(
      num_detections_equal=bool(np.array_equal(num, dets['num_detections'])),
      classes_equal=bool(np.array_equal(classes, dets['classes'])),
      boxes_max_abs=float(np.max(np.abs(boxes - dets['boxes']))),
      scores_max_abs=float(np.max(np.abs(scores - dets['scores']))),
      num_detections=dets['num_detections'].tolist())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--canvas', type=int, default=128)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--timeout', type=int, default=300,
                      help='seconds per conversion before it counts as a hang')
  parser.add_argument('--parts', default='',
                      help='comma-separated substrings: only these parts')
  parser.add_argument('--verbose', action='store_true',
                      help='print the traceback of each failure')
  args = parser.parse_args(argv)
  missing = _missing_extras()
  if missing:
    print(f'try_onnx: {", ".join(missing)} not installed (extras, not in '
          'requirements.txt): pip install jax2onnx onnxruntime onnx. Nothing '
          'was tried.')
    return 0
  import importlib.metadata as md
  import jax
  signal.signal(signal.SIGALRM, _on_alarm)
  print('versions: ' + ', '.join(
      f'{p} {md.version(p)}' for p in ('jax', 'jaxlib', 'flax', 'jax2onnx',
                                       'onnx', 'onnxruntime')))
  print(f'tiny model (tests/eval_helper.tiny_config), canvas '
        f'{args.canvas}x{args.canvas}, batch {args.batch}, '
        f'backend {jax.default_backend()}')
  config, variables, categories = tiny_setup(args.canvas)
  inputs, parts = build_parts(config, variables, categories, args.batch,
                              args.canvas)
  wanted = [p for p in args.parts.split(',') if p]
  rows = []
  for name, fn, fn_args in parts:
    if wanted and not any(w in name for w in wanted):
      continue
    row = try_part(name, fn, fn_args, args.timeout)
    rows.append(row)
    print(f'-- {name}: converted {row["converted"]} {row["blocking"]} '
          f'{row["where"]} {row["diff"]} ({row["seconds"]} s)', flush=True)
    if 'error' in row:
      print(f'   {row["error"]}')
      if row.get('missing'):
        print(f'   primitives without any jax2onnx plugin: {row["missing"]}')
      if args.verbose:
        print(row['traceback'])
  print()
  print('| part | converted | blocking primitive | where (mimicdet_jax) | '
        'max abs diff vs JAX (per output) |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["part"]} | {r["converted"]} | {r["blocking"] or "-"} | '
          f'{r["where"] or "-"} | {r["diff"] or "-"} |')
  whole = [r for r in rows if r['part'] == 'whole detector']
  if whole and whole[0]['ort'] is not None:
    print('\nwhole detector, onnxruntime vs the loader (Detector.load):',
          compare_with_loader(config, variables, categories, inputs,
                              whole[0]['ort']))
  return 0


if __name__ == '__main__':
  sys.exit(main())
