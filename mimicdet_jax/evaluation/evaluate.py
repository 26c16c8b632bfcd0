"""The evaluation loop: detect on the validation split, write and score.

`evaluate` builds the validation source, checks its categories against the
training ones (restore.check_categories), runs the predict function
(postprocess.make_predict_fn) on every local device (inference.run_inference),
gathers every host's results on process 0 (inference.gather_across_hosts),
writes WORKDIR/eval/detections.json and metrics.json
(coco_eval.detections_to_coco, coco_eval.coco_evaluate) and draws the
first images (viz.draw_detections).
"""
import functools
import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from mimicdet_jax.evaluation import coco as coco_eval
from mimicdet_jax.evaluation import inference
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import restore
from mimicdet_jax import viz as viz_lib  # `viz` is evaluate's argument


@functools.lru_cache(maxsize=4)
def _predict_fn_of_config(config) -> Callable[..., dict[str, jax.Array]]:
  """One compiled predict function per (frozen, hashable) config, so that
  periodic evaluation during training does not recompile each time."""
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
  return postprocess.make_predict_fn(mimicdet.MimicDet(config), config)


def evaluate(config, variables, workdir: str, step: Optional[int] = None, *,
             viz: Optional[int] = None, model=None,
             out_dir: Optional[str] = None,
             weights: Optional[str] = None) -> Optional[dict[str, Any]]:
  """Detects on the validation split, writes and scores the results.

  `config` is the resolved (frozen) config; the compiled predict function
  is cached per config. Every process calls this (each runs its shard of the
  images on its local devices); process 0 gathers, writes OUT/detections.json and
  OUT/metrics.json (OUT = WORKDIR/eval unless `out_dir`), appends the metrics
  with `step` to OUT/history.jsonl, prints the COCO and per-class tables and
  draws the first `viz` images (default eval.viz) to OUT/viz/. `weights`
  ('ema' | 'raw', which weights `variables` are) is recorded in metrics.json.

  Returns:
    The metrics dict on process 0, None on the others.
  """
  from mimicdet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out_dir = out_dir or os.path.join(workdir, 'eval')
  viz = int(config.eval.viz if viz is None else viz)
  source = pipeline.build_source(config.data, 'val')
  restore.check_categories(config, workdir, source)
  pid, pcount = jax.process_index(), jax.process_count()
  batch_size = max(1, -(-int(config.eval.batch_size) // pcount))
  batches = pipeline.make_eval_batches(config, source, batch_size, pid, pcount)
  predict_fn = (_predict_fn_of_config(config) if model is None
                else postprocess.make_predict_fn(model, config))

  drawn = []

  def draw(batch, dets):
    if pid != 0 or len(drawn) >= viz:
      return
    os.makedirs(os.path.join(out_dir, 'viz'), exist_ok=True)
    for b in np.nonzero(batch['example_valid'])[0]:
      if len(drawn) >= viz:
        break
      # The picture is the network input (resized image, canvas pixels),
      # so it needs nothing but the batch, whatever the source.
      h, w = (int(v) for v in batch['image_size'][b])
      image = (np.asarray(batch['image'][b, :h, :w]) *
               np.asarray(config.data.pixel_std) +
               np.asarray(config.data.pixel_mean))
      gt = batch['box_mask'][b]
      valid = dets['valid'][b]
      picture = viz_lib.draw_detections(
          np.clip(np.round(image), 0, 255).astype(np.uint8),
          dets['boxes'][b][valid], dets['scores'][b][valid],
          dets['classes'][b][valid], source.class_names,
          config.eval.viz_score_threshold, batch['boxes'][b][gt],
          batch['classes'][b][gt])
      path = os.path.join(out_dir, 'viz',
                          f'{int(batch["image_id"][b]):012d}.png')
      picture.save(path)
      drawn.append(path)

  dets = inference.run_inference(predict_fn, variables, batches, on_batch=draw)
  dets = inference.gather_across_hosts(dets)
  if pid != 0:
    return None
  results = coco_eval.detections_to_coco(dets, dets,
                                         source.label_to_category_id)
  metrics = write_and_score(config, source, results, out_dir, step,
                            len(dets['image_id']), weights=weights)
  if drawn:
    print(f'{len(drawn)} pictures (gt green, detections red, score >= '
          f'{config.eval.viz_score_threshold}) in {os.path.dirname(drawn[0])}')
  return metrics


def write_and_score(config, source, results: list, out_dir: str,
                    step: Optional[int], num_images: int, *,
                    weights: Optional[str] = None) -> dict[str, Any]:
  """OUT/detections.json, pycocotools, OUT/metrics.json and history.jsonl.

  `results` are COCO results-format dicts of the validation `source`; the
  checkpoint (`evaluate`) and the exported detector
  (evaluation/exported.evaluate_exported) are scored by this same code.
  """
  det_path = os.path.join(out_dir, 'detections.json')
  coco_eval.write_json(det_path, results)
  if step is not None:
    print(f'Evaluation at step {step}'
          f'{f" ({weights} weights)" if weights else ""} on {num_images} '
          'images:')
  coco_gt, gt_name = coco_eval.ground_truth(source, config)
  metrics = coco_eval.coco_evaluate(coco_gt, results)
  metrics.update(step=step, annotations=gt_name,
                 detections=os.path.abspath(det_path))
  if weights is not None:
    metrics['weights'] = weights
  coco_eval.write_json(os.path.join(out_dir, 'metrics.json'), metrics)
  with open(os.path.join(out_dir, 'history.jsonl'), 'a') as f:
    f.write(json.dumps({k: v for k, v in metrics.items()
                        if k in coco_eval.SUMMARY_KEYS or k == 'step'})
            + '\n')
  return metrics
