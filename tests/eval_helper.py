"""A random-init MimicDet checkpoint and a tiny synthetic set, for the slow
end-to-end tests of eval.py and predict (tests/test_eval_cli.py,
tests/test_predict.py). Saved with the project's own checkpoint code, so
`restore.restore_variables` reads what training writes.

Run as a script, one process of a multi-process `gather_across_hosts` test:

  python tests/eval_helper.py --coordinator localhost:PORT --num_processes 2 \
      --process_id I --out FILE
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from configs import demo  # pylint: disable=wrong-import-position
from mimicdet_jax import checkpoint as checkpoint_lib
from mimicdet_jax import config_lib
from mimicdet_jax.training import launch
from mimicdet_jax.training import state as state_lib

STEP = 3


def tiny_config(data_dir: str):
  """configs/demo.py shrunk further: 128 px canvas, narrow heads."""
  c = demo.get_config()
  for split in ('train', 'val'):
    c.data[f'{split}_annotations'] = f'{data_dir}/annotations/{split}.json'
    c.data[f'{split}_images'] = f'{data_dir}/{split}'
  c.data.min_size = c.data.max_size = 128
  c.data.train_min_sizes = (128,)
  c.data.canvas_buckets = ((128, 128),)
  c.model.fpn_channels = c.refine.channels = c.s_head.channels = 16
  c.s_head.offset_hidden = (8, 8)
  c.s_head.cls_dim = c.s_head.reg_dim = c.t_head.fc_dim = 32
  c.t_head.conv_dim = 16
  c.t_head.num_convs = 1
  c.eval.batch_size = 4
  c.eval.pre_nms_topk = 40
  c.eval.max_detections = 10
  c.eval.viz = 2
  c.eval.viz_score_threshold = 0.0  # random weights: draw whatever comes out
  return c


def make_workdir(root: str, init: str = 'model', edit=None):
  """root/data (5 val images) + root/work (config.json, checkpoint STEP).

  init: 'model' runs the real initialisers (jitted model.init: ~40 s of
  XLA compile on 2 cores); 'numpy' fills the same tree at their scales
  (benchmarks/common.init_variables, a few seconds). edit(recipe) may change
  the tiny config before it is resolved and written.

  Returns (recipe config, resolved config, data dir, workdir).
  """
  from mimicdet_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(root, 'data')
  synthetic.main([data_dir, '--num-train', '2', '--num-val', '5', '--seed',
                  '0', '--min-size', '96', '--max-size', '160', '--workers',
                  '1'])
  recipe = tiny_config(data_dir)
  if edit is not None:
    edit(recipe)
  config = config_lib.resolve(recipe, len(synthetic.CATEGORIES))
  workdir = os.path.join(root, 'work')
  launch.write_config(config, workdir)
  model = mimicdet.MimicDet(config)
  if init == 'numpy':
    from benchmarks import common as bench  # pylint: disable=g-import-not-at-top
    variables = bench.init_variables(config, model, 'numpy')
  else:
    variables = state_lib.init_variables(config, model, jax.random.PRNGKey(0))
  mask = backbones.frozen_param_mask(variables['params'],
                                     config.model.backbone.frozen_stages)
  state, _ = state_lib.create_train_state(config, variables, mask,
                                          jax.random.PRNGKey(0))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     save_every=1, keep=1)
  ckpt.save(STEP, state, force=True)
  ckpt.close()
  return recipe, config, data_dir, workdir


def host_detections(process_id: int, m: int = 3) -> dict:
  """Process i holds 2 + 3 i images with ids 100 i + j (+ 2**40 on process
  1: 64-bit ids must survive the gather) and known values."""
  n = 2 + 3 * process_id
  ids = 100 * process_id + np.arange(n) + (2**40 if process_id else 0)
  return dict(
      boxes=np.broadcast_to(ids[:, None, None], (n, m, 4)).astype(np.float32),
      scores=np.full((n, m), 0.5, np.float32),
      classes=np.full((n, m), process_id + 1, np.int32),
      valid=np.ones((n, m), bool), image_id=ids.astype(np.int64),
      image_size=np.full((n, 2), 64, np.int32),
      orig_size=np.full((n, 2), 32, np.int32))


def _gather_main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator', required=True)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  from mimicdet_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  launch.initialize_distributed(args.coordinator, args.num_processes,
                                   args.process_id)
  gathered = inference.gather_across_hosts(host_detections(args.process_id))
  if jax.process_index() == 0:
    with open(args.out, 'w') as f:
      json.dump({k: np.asarray(v).tolist() for k, v in gathered.items()}, f)


if __name__ == '__main__':
  _gather_main()
