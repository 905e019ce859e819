"""The Stable Diffusion U-Net's CPU variants: chunked attention and per-level convolutions compute
the same function as the defaults."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import LatentUNet, LatentUNetConfig
from diffusion_jax.models.attention import attention
from diffusion_jax.models.transformer import chunked_attention


@pytest.mark.parametrize("block_logits", [3 * 13, 7 * 13, 2**21])  # 3 queries, 7, all 20
def test_chunked_attention_is_plain_attention(block_logits):
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 20, 3, 8))
  k = k[:, :13]
  v = v[:, :13]
  want = attention(q, k, v, None, jnp.float32)
  got = chunked_attention(q, k, v, jnp.float32, block_logits)
  assert got.shape == want.shape == (2, 20, 3, 8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_attention_has_the_gradient_of_plain_attention():
  q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 9, 2, 4))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  plain = jax.grad(loss(lambda q, k, v: attention(q, k, v, None, jnp.float32)), (0, 1, 2))
  chunked = jax.grad(loss(lambda q, k, v: chunked_attention(q, k, v, jnp.float32, 18)), (0, 1, 2))
  for a, b in zip(chunked(q, k, v), plain(q, k, v), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fast_compile")
def test_cpu_variants_of_the_unet_compute_the_same_function():
  config = LatentUNetConfig(
    block_channels=(8,),
    cross_attention=(True,),
    layers_per_block=1,
    num_heads=(2,),
    transformer_layers=(1,),
    context_dim=12,
    num_groups=4,
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t, context = jnp.array([3.0, 700.0]), jax.random.normal(jax.random.key(1), (2, 5, 12))
  params = jax.jit(LatentUNet(config).init)(jax.random.key(2), x, t, context)
  want = jax.jit(LatentUNet(config).apply)(params, x, t, context)
  fast = dataclasses.replace(config, attention="chunked", conv=("winograd",))
  got = jax.jit(LatentUNet(fast).apply)(params, x, t, context)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("conv", ("xla",), "needs one entry per level"),
    ("conv", ("xla", "fft"), "conv='fft' is not one of"),
    ("attention", "sparse", "attention='sparse' is not one of"),
  ],
)
def test_bad_options_are_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    LatentUNetConfig(block_channels=(8, 16), **{field: value}, **_two_levels())


def _two_levels() -> dict:
  return dict(
    cross_attention=(True, False), num_heads=(2, 2), transformer_layers=(1, 1), num_groups=4
  )
