r"""glibc malloc settings and mimalloc on the demo training step, side by side in one run.

  python benchmarks/cpu_malloc.py --steps 30 [--variants base,hugetlb,mimalloc]

XLA:CPU allocates a step's temporaries (168 MiB for the demo step at batch
4) afresh on every call. glibc serves blocks over its mmap threshold (at
most 32 MiB) with a fresh mmap, so every 4 KiB page of them faults once per
step and is zeroed by the kernel: `perf` puts ~22 % of the step's cycles in
the kernel's page-fault path (docs/BENCHMARKS.md, "Memory allocation on
CPU"). GLIBC_TUNABLES is read when a process starts, so each variant runs
`benchmarks/train_step.py` in a fresh process; `base` runs with the variable
removed (glibc's defaults), first and again last. The table gives the
steady-state step, its ratio to the first baseline, the minor page faults
per step, and the loss after the same steps (allocation must not change the
arithmetic: it must be identical). `mimalloc` preloads the cmeel-mimalloc
wheel's library as the Makefile does (mimicdet_jax/cpu_alloc.py), with
GLIBC_TUNABLES removed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top,wrong-import-position

# The heap kept instead of trimmed: mmap threshold at glibc's maximum,
# trimming and top padding far above the step's working set.
_KEEP_HEAP = ('glibc.malloc.mmap_threshold=33554432:'
              'glibc.malloc.trim_threshold=2147483648:'
              'glibc.malloc.top_pad=268435456')

# No direct mmap at all, and no trimming of the heap.
_NO_MMAP = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296'

# name -> GLIBC_TUNABLES (None: unset, glibc's defaults)
TUNABLES = {
    'base': None,
    # Fresh mmap chunks and heap growth advised as transparent huge pages
    # (needs THP `madvise` or `always`, /sys/kernel/mm/transparent_hugepage):
    # a 2 MiB page faults once where 512 small pages did.
    'hugetlb': 'glibc.malloc.hugetlb=1',
    'keep_heap': _KEEP_HEAP,
    'hugetlb_keep_heap': 'glibc.malloc.hugetlb=1:' + _KEEP_HEAP,
    # No direct mmap and no trimming: the threads' arenas still map and
    # unmap their own heaps.
    'hugetlb_no_mmap': 'glibc.malloc.hugetlb=1:' + _NO_MMAP,
    # ... unless every thread shares the main arena: no page faults, but the
    # threads contend for its lock.
    'hugetlb_no_mmap_one_arena': ('glibc.malloc.hugetlb=1:' + _NO_MMAP +
                                  ':glibc.malloc.arena_max=1'),
}


def mimalloc_env() -> dict:
  """What the Makefile preloads (mimicdet_jax/cpu_alloc.py)."""
  from mimicdet_jax import cpu_alloc  # pylint: disable=g-import-not-at-top
  return cpu_alloc.mimalloc_env() or {'LD_PRELOAD': '(cmeel-mimalloc missing)'}


def variant_env(name: str) -> dict:
  if name == 'mimalloc':
    return dict(mimalloc_env(), GLIBC_TUNABLES=None)
  return {'GLIBC_TUNABLES': TUNABLES[name]}


VARIANTS = dict(TUNABLES, mimalloc=None)


def run(name, args):
  env = variant_env(name)
  r = side_by_side.train_step(args.config, batch=args.batch, steps=args.steps,
                              warmup=args.warmup, env=env)
  shown = ' '.join(f'{k}={v}' for k, v in env.items()
                   if v is not None and k != 'LD_PRELOAD')
  if 'LD_PRELOAD' in env:
    shown = 'LD_PRELOAD=libmimalloc.so ' + shown
  if 'error' in r:
    return dict(env=shown, error=r['error'])
  return dict(env=shown, step_s=r['step_s'],
              faults=r['minor_page_faults_per_step'], loss=r['last_loss'])


def main():
  ap = side_by_side.arg_parser(__doc__, VARIANTS)
  ap.add_argument('--batch', type=int, default=4)
  args = ap.parse_args()
  names = side_by_side.variant_names(args)
  rows = side_by_side.run_all(names, VARIANTS, lambda name: run(name, args))
  side_by_side.print_table(
      ('variant', 'environment', 'step', '/ base', 'page faults / step',
       'loss'), rows,
      lambda r, base: [f"`{r['env'] or '(unset)'}`",
                       f"{r['step_s'] * 1e3:.0f} ms",
                       f"{r['step_s'] / base:.2f}", f"{r['faults']:.0f}",
                       repr(r['loss'])])
  side_by_side.save(args.json, rows)


if __name__ == '__main__':
  main()
