"""Element-wise detection losses: sigmoid BCE, focal, softmax CE, L1.

Each function returns an unreduced loss (one value per element, per logit
vector or per box) so the callers choose masks and normalisers in plain sight.
Inputs are cast to float32 first: bfloat16 logits lose too much in log-sum-exp.
"""
import jax
import jax.numpy as jnp
import optax


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary cross-entropy on logits; same shape as `logits`.

  Args:
    logits: [...] unnormalised log-odds.
    labels: [...] targets in {0, 1} (floats in [0, 1] allowed).
  """
  return optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), labels.astype(jnp.float32))


def sigmoid_focal(logits: jax.Array, labels: jax.Array, alpha: float,
                  gamma: float) -> jax.Array:
  """RetinaNet focal loss -alpha_t (1 - p_t)^gamma log(p_t); same shape as `logits`.

  `alpha` weighs the positives (1 - alpha the negatives), as in Lin et al.
  """
  return optax.sigmoid_focal_loss(
      logits.astype(jnp.float32), labels.astype(jnp.float32),
      alpha=alpha, gamma=gamma)


def softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels.

  Args:
    logits: [..., L] unnormalised; index 0 is background.
    labels: [...] int in [0, L).

  Returns:
    [...] the loss per logit vector.
  """
  # A one-hot product, not optax's take_along_axis: the gradient of a
  # gather is a scatter-add, which TPUs serialise and whose cost XLA:TPU's
  # cost analysis does not model under the per-image vmap (the whole step
  # then had no optimal_seconds; docs/BENCHMARKS.md, "TPU, compiled on CPU").
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return -jnp.sum(one_hot * log_p, axis=-1)


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
  """L1 distance summed over the last axis (the 4 box deltas): [..., 4] -> [...]."""
  return jnp.sum(
      jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
  """Element-wise smooth L1 (Huber with threshold `beta`, divided by `beta`).

  0.5 x^2 / beta for |x| < beta, |x| - 0.5 beta otherwise; same shape as `pred`.
  """
  x = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / jnp.maximum(den.astype(jnp.float32), 1.0)


# refine.cls_loss: the refinement module's objectness loss (`refine_loss`).
REFINE_CLS_LOSSES = ('bce', 'focal')


def refine_loss(logits: jax.Array, deltas: jax.Array, positive: jax.Array,
                delta_targets: jax.Array, sampled: jax.Array | None, *,
                cls_loss: str, focal_alpha: float, focal_gamma: float
                ) -> dict[str, jax.Array]:
  """Refinement-module loss over a batch.

  Args:
    logits: [B, A] objectness logits.
    deltas: [B, A, 4] predicted deltas on the anchors.
    positive: [B, A] bool.
    delta_targets: [B, A, 4].
    sampled: [B, A] bool positions of the sampled BCE (cls_loss 'bce');
      ignored for 'focal', which uses every position.
    cls_loss: 'bce' (mean over the sampled positions, as detectron2's RPN) or
      'focal' (sum over all positions / number of positives, as RetinaNet).
    focal_alpha, focal_gamma: focal-loss parameters.

  Returns:
    dict `cls`, `reg` (L1 summed over the 4 deltas, mean over positives) and
    `num_positives` (total over the batch), scalars.
  """
  labels = positive.astype(jnp.float32)
  num_pos = jnp.sum(positive)
  if cls_loss == 'bce':
    per = sigmoid_bce(logits, labels)
    cls = _safe_div(jnp.sum(jnp.where(sampled, per, 0.0)), jnp.sum(sampled))
  else:  # 'focal'
    per = sigmoid_focal(logits, labels, focal_alpha, focal_gamma)
    cls = _safe_div(jnp.sum(per), num_pos)
  reg = _safe_div(jnp.sum(jnp.where(positive, l1(deltas, delta_targets), 0.0)),
                  num_pos)
  return dict(cls=cls, reg=reg, num_positives=num_pos)


def t_head_loss(cls_logits: jax.Array, deltas: jax.Array, labels: jax.Array,
                delta_targets: jax.Array, valid: jax.Array
                ) -> dict[str, jax.Array]:
  """T-head loss over a batch of sampled boxes (detectron2 fast R-CNN style).

  Args:
    cls_logits: [B, S, L]; deltas: [B, S, 4] class-agnostic.
    labels: [B, S] int (0 background); delta_targets: [B, S, 4].
    valid: [B, S] bool, sampled (not padding).

  Returns:
    dict `cls` (CE mean over valid samples) and `reg` (L1 summed over the
    foreground samples, divided by the number of valid samples).
  """
  n = jnp.sum(valid)
  cls = _safe_div(jnp.sum(jnp.where(valid, softmax_ce(cls_logits, labels), 0.0)),
                  n)
  fg = valid & (labels > 0)
  reg = _safe_div(jnp.sum(jnp.where(fg, l1(deltas, delta_targets), 0.0)), n)
  return dict(cls=cls, reg=reg)


def ohem_mask(losses: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """Online hard example mining: the k largest valid losses per row.

  Args:
    losses: [..., N] per-item losses (only their order matters; no gradient
      flows through the selection).
    valid: [..., N] bool.
    k: static number to keep (capped at N); fewer when fewer are valid.

  Returns:
    [..., N] bool mask of the kept items.
  """
  n = losses.shape[-1]
  k = min(k, n)
  score = jnp.where(valid, jax.lax.stop_gradient(losses), -jnp.inf)
  _, idx = jax.lax.top_k(score, k)
  kept = jnp.zeros(losses.shape, bool)
  kept = jnp.put_along_axis(kept, idx, True, axis=-1, inplace=False)
  return kept & valid


def s_head_loss(cls_logits: jax.Array, deltas: jax.Array, labels: jax.Array,
                delta_targets: jax.Array, valid: jax.Array, ohem_samples: int,
                sampled: jax.Array | None = None) -> dict[str, jax.Array]:
  """S-head loss with hard-example mining over each image's proposals.

  Per proposal: CE + L1 (foreground only); per image keep the `ohem_samples`
  largest (or, given `sampled`, exactly those proposals: the balanced
  sampling of `s_head.sampling=balanced`); average over everything kept in
  the batch.

  Args:
    cls_logits: [B, P, L] S-head logits read at each proposal's origin.
    deltas: [B, P, 4] S-head deltas at the origin (on the refined box).
    labels: [B, P]; delta_targets: [B, P, 4]; valid: [B, P] bool.
    ohem_samples: `s_head.ohem_samples`.
    sampled: optional [B, P] bool; replaces the hard-example mining.

  Returns:
    dict `total` (the loss), and its `cls` and `reg` parts (both over the
    kept proposals, so total = cls + reg), `num_kept`, `num_kept_fg`.
  """
  ce = softmax_ce(cls_logits, labels)
  reg = jnp.where(labels > 0, l1(deltas, delta_targets), 0.0)
  if sampled is None:
    kept = ohem_mask(ce + reg, valid, ohem_samples)
  else:
    kept = sampled & valid
  n = jnp.sum(kept)
  cls = _safe_div(jnp.sum(jnp.where(kept, ce, 0.0)), n)
  reg = _safe_div(jnp.sum(jnp.where(kept, reg, 0.0)), n)
  return dict(total=cls + reg, cls=cls, reg=reg, num_kept=n,
              num_kept_fg=jnp.sum(kept & (labels > 0)))
