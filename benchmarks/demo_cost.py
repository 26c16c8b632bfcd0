r"""What a cheaper demo would save: the demo's training step under recipe changes, side by side.

  python benchmarks/demo_cost.py --steps 20 [--variants base,batch2,canvas224]

Each variant runs `benchmarks/train_step.py --config configs/demo.py` in a
fresh process with its own batch, canvas or `--config.*` overrides; the
baseline runs first and again last so that drift of a shared machine shows.
The table gives the steady-state step, its ratio to the first baseline and
the images per second. Which of them keeps the demo's accuracy bar is a
training question (docs/RESULTS.md), not this script's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top,wrong-import-position

_LEVELS_TO_P6 = ['--config.model.s_levels=(3,4,5,6)',
                 '--config.model.t_levels=(2,3,4,5)']

# name -> (batch, extra train_step.py arguments)
VARIANTS = {
    'base': (4, []),
    'batch2': (2, []),
    'batch3': (3, []),
    'proposals150': (4, ['--config.proposals.num_proposals=150',
                         '--config.proposals.pre_nms_topk=150']),
    's_channels32': (4, ['--config.s_head.channels=32']),
    'heads_half': (4, ['--config.t_head.num_samples=32',
                       '--config.s_head.ohem_samples=32']),
    't_samples32': (4, ['--config.t_head.num_samples=32']),
    # One 3x3 conv in the T-head's regression branch instead of two.
    't_convs1': (4, ['--config.t_head.num_convs=1']),
    'heads_half_proposals150': (4, ['--config.t_head.num_samples=32',
                                    '--config.s_head.ohem_samples=32',
                                    '--config.proposals.num_proposals=150',
                                    '--config.proposals.pre_nms_topk=150']),
    'photos': (4, ['--config', 'configs/photos.py']),  # the own-data recipe
    'batch2_proposals150': (2, ['--config.proposals.num_proposals=150',
                                '--config.proposals.pre_nms_topk=150']),
    # Without P7 (and the T-head without P6): on a 256 canvas P7's anchors
    # (512 px) are larger than the image.
    'levels_p6': (4, _LEVELS_TO_P6),
    # The same levels on a 192 canvas (divisible by P6's stride, 64): the
    # images resized to 0.75x, 0.56x the pixels.
    'canvas192': (4, _LEVELS_TO_P6 + [
        '--config.data.size_divisor=64',
        '--config.data.canvas_buckets=((192,192),)']),
}


def run(name, args):
  batch, extra = VARIANTS[name]
  r = side_by_side.train_step(args.config, batch=batch, steps=args.steps,
                              warmup=args.warmup, extra_args=extra)
  if 'error' in r:
    return r
  return dict(batch=batch, args=' '.join(extra), step_s=r['step_s'],
              compile_s=r['first_step_backend_compile_s'])


def main():
  ap = side_by_side.arg_parser(__doc__, VARIANTS)
  args = ap.parse_args()
  names = side_by_side.variant_names(args)
  rows = side_by_side.run_all(names, VARIANTS, lambda name: run(name, args))
  side_by_side.print_table(
      ('variant', 'batch', 'arguments', 'step', '/ base', 'images/s',
       'compile'), rows,
      lambda r, base: [str(r['batch']), f"`{r['args'] or '(demo)'}`",
                       f"{r['step_s'] * 1e3:.0f} ms",
                       f"{r['step_s'] / base:.2f}",
                       f"{r['batch'] / r['step_s']:.1f}",
                       f"{r['compile_s']:.1f} s"])
  side_by_side.save(args.json, rows)


if __name__ == '__main__':
  main()
