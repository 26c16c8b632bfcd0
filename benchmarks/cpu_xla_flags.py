r"""XLA:CPU options on the demo training step, measured side by side in one run.

  python benchmarks/cpu_xla_flags.py --steps 20 [--variants base,onednn_dot]

Each variant runs `benchmarks/train_step.py --config configs/demo.py --batch 4`
in a fresh process with its own XLA_FLAGS (the flags are read once, when
the backend starts), the baseline first and again last so that drift of a
shared machine shows. The table gives the steady-state step, its ratio to
the first baseline, the XLA compile seconds, and the loss after the same
warm-up + timed steps on the same batch (a variant that changes the maths
changes it beyond float noise). docs/BENCHMARKS.md has the results.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top,wrong-import-position

# The test suite's compile-time flags until 2026-12-07's sixth stop ...
FAST_COMPILE = ('--xla_backend_optimization_level=0 '
                '--xla_llvm_disable_expensive_passes=true')
NO_FUSION_EMITTERS = '--xla_cpu_use_fusion_emitters=false'

# Options of jaxlib 0.10's XLA:CPU (`strings libjax_common.so`); the fusion
# lists default to empty, i.e. off.
VARIANTS = {
    'base': '',
    'onednn_custom_call': '--xla_cpu_experimental_onednn_custom_call=true',
    'onednn_dot': '--xla_cpu_experimental_onednn_fusion_type=dot',
    'onednn_dot_eltwise':
        '--xla_cpu_experimental_onednn_fusion_type=dot,eltwise',
    'ynn_dot': '--xla_cpu_experimental_ynn_fusion_type=dot',
    'ynn_dot_eltwise_reduce':
        '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce',
    'xnn_dot': '--xla_cpu_experimental_xnn_fusion_type=dot',
    'xnn_dot_eltwise_reduce':
        '--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce',
    'no_multi_thread_eigen': '--xla_cpu_multi_thread_eigen=false',
    'vector_width_256': '--xla_cpu_prefer_vector_width=256',
    'fast_compile': FAST_COMPILE,
    # ... and since (tests/conftest.py): loop fusions by the older elemental
    # IR emitters, which XLA:CPU compiles in less time.
    'fast_compile_no_fusion_emitters': f'{FAST_COMPILE} {NO_FUSION_EMITTERS}',
    'no_fusion_emitters': NO_FUSION_EMITTERS,
    'llvm_cheap': '--xla_llvm_disable_expensive_passes=true',
    'concurrency_scheduler':
        '--xla_cpu_enable_concurrency_optimized_scheduler=true',
    'no_concurrency_scheduler':
        '--xla_cpu_enable_concurrency_optimized_scheduler=false',
}


def run(flags, args):
  r = side_by_side.train_step(args.config, batch=args.batch, steps=args.steps,
                              warmup=args.warmup, xla_flags=flags)
  if 'error' in r:
    return dict(flags=flags, error=r['error'])
  return dict(flags=flags, step_s=r['step_s'],
              compile_s=r['first_step_backend_compile_s'],
              loss=r['last_loss'])


def main():
  ap = side_by_side.arg_parser(__doc__, VARIANTS)
  ap.add_argument('--batch', type=int, default=4)
  args = ap.parse_args()
  names = side_by_side.variant_names(args)
  rows = side_by_side.run_all(names, VARIANTS,
                              lambda name: run(VARIANTS[name], args))
  side_by_side.print_table(
      ('variant', 'XLA_FLAGS', 'step', '/ base', 'compile', 'loss'), rows,
      lambda r, base: [f"`{r['flags'] or '(none)'}`",
                       f"{r['step_s'] * 1e3:.0f} ms",
                       f"{r['step_s'] / base:.2f}",
                       f"{r['compile_s']:.1f} s", f"{r['loss']:.5f}"])
  side_by_side.save(args.json, rows)


if __name__ == '__main__':
  main()
