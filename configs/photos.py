"""The demo recipe for your own photographs: GroupNorm heads, KL mimic x2, S-head lr x3.

configs/demo.py was the paper's recipe at demo widths when this was
measured; on the synthetic shapes its S-head reached 0.91 of its teacher's
AP, on the real-image proxy (data/photos, `make proxy-data`) only 0.71.
This recipe changed five keys, each measured on both sets
(docs/S_HEAD_GAP.md E12-E15, docs/RESULTS.md "Recipe for own
photographs"), and keeps the one AdamW lr of 1e-3 and the 100-step warm-up
it was measured with, and the demo's sizes and schedule of that time
(configs/demo.py has since taken 3e-3 with the T-head at 1e-3, KL, a
400-step warm-up, E20-E22, and half the heads' samples at 2200 steps, E23;
the two recipes together are not measured):

- t_head.norm / s_head.norm = 'group_norm': GroupNorm before the heads'
  hidden ReLUs, which otherwise die in the regression features (E12);
- mimic.distance = 'kl': the S-head matches the teacher's class
  distribution, margin included, not only the logits' direction (E8, E13);
  configs/demo.py now has it too, so it is no longer in CHANGES;
- optim.s_head_lr_mult = 3: the S-head, which learns more slowly than its
  teacher, takes three times the learning rate (E13);
- mimic.weight = 2: the S-head follows its teacher twice as hard (E15).

On the proxy (5 seeds) S / T AP rises from 0.71 to 0.82 (0.801-0.824 per
seed); on the shapes (4 seeds) the S-head's AP stays where it was (67.8)
and the teacher gains, so S / T falls from 0.91 to 0.89: the sets disagree,
so `make demo` keeps the paper's recipe and this one is the documented
recipe for real photographs. Its step costs the demo's (217 vs 215 ms,
benchmarks/demo_cost.py), so it trains in the demo's minutes.
`--config.s_head.offset_mode=box_learned` added +0.8 S AP on the proxy
[-0.2, +1.8] to the four-key recipe (E14, not measured on the shapes).

The data paths default to the proxy; point them at your COCO-format set:
  python train.py --config configs/photos.py --workdir workdirs/mine \
      --config.data.train_annotations=... --config.data.train_images=... \
      --config.data.val_annotations=... --config.data.val_images=...
"""
from configs import proxy_real

# The keys this recipe changes from configs/proxy_real.py (= configs/demo.py
# on data/photos); tests/test_config.py checks that nothing else differs.
CHANGES = {
    't_head.norm': 'group_norm',
    's_head.norm': 'group_norm',
    'optim.s_head_lr_mult': 3.0,
    'mimic.weight': 2.0,
    # Measured with one AdamW lr of 1e-3 for the whole model and a 100-step
    # warm-up (E12-E15), before configs/demo.py took 3e-3 with the T-head at
    # 1e-3, KL and a 400-step warm-up (E20, E22).
    'optim.base_lr': 4e-3,
    'optim.t_head_lr_mult': 1.0,
    'optim.warmup_steps': 100,
    # ... and with the demo's sizes of that time: 64 T-head RoIs and 64
    # S-head OHEM samples per image, 2400 steps (the demo has since taken
    # 32 / 32 and 2200 steps for issue 23's 10 minutes, E23).
    't_head.num_samples': 64,
    's_head.ohem_samples': 64,
    'train.total_steps': 2400,
    'optim.decay_steps': (1920, 2240),
    'train.checkpoint_every': 800,
}


def get_config():
  c = proxy_real.get_config()
  for dotted, value in CHANGES.items():
    section, key = dotted.split('.')
    c[section][key] = value
  return c
