"""Shared piece of the stand-in detectors of the loss tests
(tests/test_losses_total.py, tests/test_switches.py)."""
import jax
import jax.numpy as jnp


def pooled_levels(x: jax.Array, levels) -> tuple[dict, jax.Array]:
  """Per-pixel features -> a fake pyramid and its dense rows.

  x [B, H, W, C] is mean-pooled by 2**l for each l of `levels`, giving
  {l: [B, H / 2**l, W / 2**l, C]}, and those maps are flattened and
  concatenated in level order into [B, sum of H*W / 4**l, C]: the order of
  the model's dense anchors.
  """
  b, h, w, c = x.shape
  pooled = {l: x.reshape(b, h >> l, 2**l, w >> l, 2**l, c).mean((2, 4))
            for l in levels}
  flat = jnp.concatenate([p.reshape(b, -1, c) for p in pooled.values()], 1)
  return pooled, flat
