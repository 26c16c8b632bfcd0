"""Dual-path mimic loss: the S-head imitates the T-head on the same boxes.

SPEC 3 (L_mimic): for the T-head's sampled boxes, the S-head outputs read at
each box's origin position are pulled towards the T-head's, separately on the
classification path (the logits) and the regression path (the fc feature):
  L = mean(1 - cos(T_cls, S_cls)) + mean(1 - cos(T_reg, S_reg)).

Research variants (config `mimic.*`), each list of values defined here once
(config_lib.resolve checks the config against it):
  cls_distance, reg_distance  the distance on each path: a name in
      DISTANCES. A new distance is one function (signature `Distance`) plus
      one entry in DISTANCES; tests/test_losses_mimic.py then checks it on
      both paths against the properties every distance must have. One that
      only compares class distributions (kl) is also named in CLS_ONLY, so
      `mimic.reg_distance` rejects it (PATH_DISTANCES).
  paths         PATHS: cls | reg | both.
  teacher_grad  TEACHER_GRADS: stopped (default) | flowing.
  samples       losses/total.py MIMIC_SAMPLES (the caller's mask).
"""
from typing import Callable

import jax
import jax.numpy as jnp

from mimicdet_jax.losses import detection

_EPS = 1e-6

# distance(student [..., D], teacher [..., D], temperature) -> [...]
Distance = Callable[[jax.Array, jax.Array, float], jax.Array]


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """cos(a, b) over the last axis, [..., D] -> [...]; 0 for a zero vector."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  # max(|x|^2, eps^2) keeps the gradient finite for all-zero (dead ReLU) rows.
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1), _EPS * _EPS))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, -1), _EPS * _EPS))
  return jnp.sum(a * b, -1) / (na * nb)


def cosine_distance(student, teacher, temperature):
  """1 - cos: 0 for parallel vectors, 2 for opposite ones."""
  del temperature
  return 1.0 - cosine_similarity(student, teacher)


def l2_distance(student, teacher, temperature):
  """Mean squared difference over the feature axis."""
  del temperature
  d = student.astype(jnp.float32) - teacher.astype(jnp.float32)
  return jnp.mean(d * d, axis=-1)


def smooth_l1_distance(student, teacher, temperature):
  """Mean smooth L1 (beta 1) over the feature axis."""
  del temperature
  return jnp.mean(detection.smooth_l1(student, teacher, beta=1.0), axis=-1)


def kl_distance(student, teacher, temperature):
  """T^2 KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.)."""
  t = temperature
  log_p_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / t, axis=-1)
  log_p_s = jax.nn.log_softmax(student.astype(jnp.float32) / t, axis=-1)
  return t * t * jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


DISTANCES: dict[str, Distance] = {
    'cosine': cosine_distance,
    'l2': l2_distance,
    'smooth_l1': smooth_l1_distance,
    'kl': kl_distance,
}

# Distances that only make sense between class distributions (cls path).
CLS_ONLY = ('kl',)
# mimic.cls_distance / mimic.reg_distance: the distances valid on each path.
PATH_DISTANCES = {
    'cls': tuple(DISTANCES),
    'reg': tuple(d for d in DISTANCES if d not in CLS_ONLY),
}


# mimic.paths: the paths the mimic pulls (`mimic_paths`).
PATHS = ('cls', 'reg', 'both')
# mimic.teacher_grad: the teacher's outputs as constants, or trained by the
# mimic too (`mimic_loss`).
TEACHER_GRADS = ('stopped', 'flowing')


def mimic_paths(paths: str) -> tuple[str, ...]:
  """Config `mimic.paths` (one of PATHS) -> the paths it switches on."""
  return ('cls', 'reg') if paths == 'both' else (paths,)


def mimic_loss(student: dict[str, jax.Array], teacher: dict[str, jax.Array],
               mask: jax.Array, *, paths: str, cls_distance: str,
               reg_distance: str, temperature: float, teacher_grad: str
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mimic loss summed over paths, each a masked mean over the boxes.

  Args:
    student: {'cls': [B, S, L] S-head logits, 'reg': [B, S, D] S-head reg
      features}, read at the boxes' origins.
    teacher: the same keys from the T-head on the boxes.
    mask: [B, S] bool, boxes that take part (valid samples, or the foreground
      ones for mimic.samples=foreground).
    paths, cls_distance, reg_distance, temperature, teacher_grad: `mimic.*`
      config; each distance a name in DISTANCES.

  Returns:
    (loss scalar, {path: that path's mean distance}).
  """
  n = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
  total = jnp.zeros((), jnp.float32)
  per_path = {}
  distances = {'cls': cls_distance, 'reg': reg_distance}
  for path in mimic_paths(paths):
    t = teacher[path]
    if teacher_grad == 'stopped':
      t = jax.lax.stop_gradient(t)
    d = DISTANCES[distances[path]](student[path], t, temperature)
    per_path[path] = jnp.sum(jnp.where(mask, d, 0.0)) / n
    total = total + per_path[path]
  return total, per_path


def mean_cosine(student: jax.Array, teacher: jax.Array,
                mask: jax.Array) -> jax.Array:
  """Diagnostic: mean cos(student, teacher) over the masked boxes, no gradient."""
  cos = cosine_similarity(jax.lax.stop_gradient(student),
                          jax.lax.stop_gradient(teacher))
  return jnp.sum(jnp.where(mask, cos, 0.0)) / jnp.maximum(
      jnp.sum(mask), 1).astype(jnp.float32)
