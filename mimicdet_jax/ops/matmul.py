"""A matmul over the channel axis with a weight gradient XLA:CPU runs well."""
import jax
import jax.numpy as jnp


@jax.custom_vjp
def channel_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., Cin] @ kernel [Cin, Cout], with the weight gradient as one 2-D
  matmul x[N, Cin]^T @ dy[N, Cout] over the flattened positions.

  Same values and gradients as jnp.dot; under autodiff XLA:CPU contracted
  the positions with the output gradient transposed first (a strided copy
  of the whole [N, Cout] map per layer), which made a 1x1 layer's fwd + bwd
  about 2x slower (benchmarks/cpu_grad_variants.py, docs/BENCHMARKS.md).
  """
  return jnp.dot(x, kernel)


def _channel_matmul_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _channel_matmul_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.dot(dy, kernel.T).astype(x.dtype)
  dkernel = jnp.dot(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
  return dx, dkernel.astype(kernel.dtype)


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)
