"""Is a gap between the heads in their scores or in their boxes?

  python -m mimicdet_jax.experiments.cross_heads WORKDIR [WORKDIR ...]

Scores each run's latest checkpoint four ways on its validation split: the
S-head, the T-head, the S-head's class scores on the T-head's boxes
(eval.head=s_cls+t_box) and the T-head's scores on the S-head's boxes
(t_cls+s_box), all from the same top-k refined positions. S and T are read
from WORKDIR/eval_{s,t}/metrics.json when the grid runner wrote them; the
crossed ones go to WORKDIR/eval_s_cls_t_box/ and eval_t_cls_s_box/.
The S and T rows are also scored class-blind (`class_blind_metrics`: every
detection and every ground-truth box of one class, the same detections), so
that how much of a gap is the class and how much is finding and placing the
box can be read off. docs/S_HEAD_GAP.md E9 and E16 read the result.
"""
import contextlib
import io
import json
import os
import sys
from typing import Any, Mapping, Sequence

from mimicdet_jax.evaluation import coco
from mimicdet_jax.evaluation import evaluate as evaluate_lib
from mimicdet_jax.evaluation import restore

HEADS = ('s', 't', 's_cls+t_box', 't_cls+s_box')
KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100')


def head_metrics(workdir: str, head: str, variables=None, step=None) -> dict:
  """COCO metrics of one head choice, read if saved, else evaluated."""
  out = os.path.join(workdir, 'eval_' + head.replace('+', '_'))
  path = os.path.join(out, 'metrics.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if variables is None:
    variables, step = restore.restore_variables(workdir, 'latest')
  config = restore.load_config(workdir, head=head)
  return evaluate_lib.evaluate(config, variables, workdir, step, viz=0,
                               out_dir=out)


def class_blind_metrics(annotations: str,
                        detections: Sequence[Mapping[str, Any]]) -> dict:
  """pycocotools metrics with every class merged into one.

  A detection then matches any ground-truth box it overlaps, whatever the
  class either has; the AP that the class-aware score loses against this
  one is what wrong (or wrongly ranked) classes cost.
  """
  merged = coco.load_annotations(annotations)  # a fresh copy: ours to edit
  for ann in merged.dataset['annotations']:
    ann['category_id'] = 1
  merged.dataset['categories'] = [{'id': 1, 'name': 'object'}]
  with contextlib.redirect_stdout(io.StringIO()):
    merged.createIndex()
  return coco.coco_evaluate(
      merged, [dict(d, category_id=1) for d in detections], verbose=False)


def main(argv):
  if not argv:
    raise SystemExit(__doc__)
  print('| run | head | ' + ' | '.join(KEYS) + ' |')
  print('|---|---|' + '---|' * len(KEYS))
  for workdir in argv:
    variables, step = restore.restore_variables(workdir, 'latest')
    metrics = {}
    for head in HEADS:
      m = metrics[head] = head_metrics(workdir, head, variables, step)
      print(f'| {workdir} | {head} | ' +
            ' | '.join(f'{100 * float(m[k]):.1f}' for k in KEYS) + ' |')
    for head in ('s', 't'):
      m = metrics[head]
      dets = coco.read_detections(m['detections'])
      blind = class_blind_metrics(m['annotations'], dets)
      print(f'| {workdir} | {head}, class-blind | ' +
            ' | '.join(f'{100 * float(blind[k]):.1f}' for k in KEYS) + ' |')


if __name__ == '__main__':
  main(sys.argv[1:])
