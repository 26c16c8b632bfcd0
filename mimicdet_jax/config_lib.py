"""Resolving a recipe config into the frozen config every module reads."""
import ml_collections


def resolve(config: ml_collections.ConfigDict,
            num_classes: int) -> ml_collections.FrozenConfigDict:
  """Fills the keys left at -1 and checks the values that must agree.

  Args:
    config: a recipe config (configs/*.py), possibly with overrides.
    num_classes: foreground classes of the training annotation file; used
      when `data.num_classes` (and `model.num_classes`) are -1.

  Returns:
    A FrozenConfigDict (hashable, so Flax modules can hold it).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  if c.data.num_classes == -1:
    c.data.num_classes = int(num_classes)
  if c.model.num_classes == -1:
    c.model.num_classes = c.data.num_classes
  if c.s_head.num_logits == -1:
    c.s_head.num_logits = c.model.num_classes + 1
  if c.model.num_classes < 1:
    raise ValueError(f'model.num_classes must be >= 1, got {c.model.num_classes}')
  if c.mimic.enabled and 'cls' in _paths(c.mimic.paths) and (
      c.s_head.num_logits != c.model.num_classes + 1):
    raise ValueError(
        f's_head.num_logits={c.s_head.num_logits} differs from the T-head '
        f'({c.model.num_classes + 1} logits): the cls mimic needs equal widths')
  for key, allowed in (('mimic.paths', ('cls', 'reg', 'both')),
                       ('mimic.distance', ('cosine', 'l2', 'smooth_l1', 'kl')),
                       ('mimic.teacher_grad', ('stopped', 'flowing')),
                       ('mimic.samples', ('all', 'foreground')),
                       ('eval.head', ('s', 't', 'both')),
                       ('refine.cls_loss', ('bce', 'focal')),
                       ('model.dtype', ('float32', 'bfloat16')),
                       ('data.source', ('coco_json', 'tfds')),
                       ('data.bad_input', ('skip', 'fail'))):
    section, name = key.split('.')
    value = c[section][name]
    if value not in allowed:
      raise ValueError(f'{key}={value!r}; expected one of {allowed}')
  for h, w in c.data.canvas_buckets:
    if h % c.data.size_divisor or w % c.data.size_divisor:
      raise ValueError(f'data.canvas_buckets entry {(h, w)} is not divisible by '
                       f'data.size_divisor={c.data.size_divisor}')
  return ml_collections.FrozenConfigDict(c)


def _paths(paths: str) -> tuple[str, ...]:
  return ('cls', 'reg') if paths == 'both' else (paths,)
