"""Is a gap between the heads in their scores or in their boxes?

  python -m mimicdet_jax.experiments.cross_heads WORKDIR [WORKDIR ...]

Scores each run's latest checkpoint four ways on its validation split: the
S-head, the T-head, the S-head's class scores on the T-head's boxes
(eval.head=s_cls+t_box) and the T-head's scores on the S-head's boxes
(t_cls+s_box), all from the same top-k refined positions. S and T are read
from WORKDIR/eval_{s,t}/metrics.json when the grid runner wrote them; the
crossed ones go to WORKDIR/eval_s_cls_t_box/ and eval_t_cls_s_box/.
docs/S_HEAD_GAP.md E9 reads the result.
"""
import json
import os
import sys

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


def main(argv):
  if not argv:
    raise SystemExit(__doc__)
  print('| run | head | ' + ' | '.join(KEYS) + ' |')
  print('|---|---|' + '---|' * len(KEYS))
  for workdir in argv:
    variables, step = restore.restore_variables(workdir, 'latest')
    for head in HEADS:
      m = head_metrics(workdir, head, variables, step)
      print(f'| {workdir} | {head} | ' +
            ' | '.join(f'{100 * float(m[k]):.1f}' for k in KEYS) + ' |')


if __name__ == '__main__':
  main(sys.argv[1:])
