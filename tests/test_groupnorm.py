"""Tests of the fused GroupNorm(+swish): agreement with flax's nn.GroupNorm (outputs and all three
gradients) in exact and in low precision, and the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import layers
from diffusion_jax.models.fast import groupnorm


def reference(x, scale, bias, num_groups, act, dtype=None):
  """flax's GroupNorm (two-pass variance), then swish, differentiated by autodiff."""
  module = nn.GroupNorm(
    num_groups=num_groups,
    epsilon=1e-6,
    dtype=dtype or x.dtype,
    param_dtype=scale.dtype,
    use_fast_variance=False,
  )
  y = module.apply({"params": {"scale": scale, "bias": bias}}, x)
  return nn.swish(y) if act == "swish" else y


def inputs(shape, seed, offset=0.5):
  np_rng = np.random.default_rng(seed)
  c = shape[-1]
  x = np_rng.normal(size=shape) * 2.0 + offset
  return x, np_rng.normal(size=c), np_rng.normal(size=c), np_rng.normal(size=shape)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("act", groupnorm.ACTIVATIONS)
@pytest.mark.parametrize(
  "shape, num_groups",
  [
    ((3, 5, 7, 8), 4),
    ((2, 6, 6, 12), 3),
    ((2, 9, 16), 8),
    ((2, 4, 4, 32), 32),
    ((2, 3, 3, 6), 1),
    ((2, 3, 80), 2),  # groups wider than _GROUP_SUM_ADDS: summed by a reduction
  ],
)
def test_forward_and_gradients_equal_flax_in_float64(shape, num_groups, act, recompute):
  """Exact arithmetic: the hand-written gradient is the gradient of flax's GroupNorm, whether
  the backward pass keeps dz (CPUs) or recomputes it (GPUs, TPUs)."""
  x, scale, bias, w = inputs(shape, sum(shape) + num_groups)
  with jax.enable_x64():
    args = tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, bias))
    ours = lambda x, s, b: groupnorm.group_norm(
      x, s, b, num_groups, 1e-6, act, recompute_dz=recompute
    )
    ref = lambda x, s, b: reference(x, s, b, num_groups, act)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    # Each side compiled as one program: op by op, every shape compiles each primitive anew.
    both = lambda f: jax.jit(lambda *a: (f(*a), jax.grad(loss(f), argnums=(0, 1, 2))(*a)))
    (out, grads), (want_out, expected) = both(ours)(*args), both(ref)(*args)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    for actual, want in zip(grads, expected, strict=True):
      assert actual.dtype == jnp.float64
      np.testing.assert_allclose(actual, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("act", groupnorm.ACTIVATIONS)
@pytest.mark.parametrize("widths", [(8, 4), (5, 7), (3, 2, 7)])
def test_parts_are_normalised_as_their_concatenation(widths, act, recompute):
  """x given as arrays to concatenate (groups of 3 channels straddle the cuts): flax's output on
  the concatenation, and its gradient cut into the parts, in float64."""
  x, scale, bias, w = inputs((2, 4, 5, sum(widths)), sum(widths))
  cuts = np.cumsum(widths)[:-1]
  with jax.enable_x64():
    parts = tuple(jnp.asarray(p, jnp.float64) for p in np.split(x, cuts, axis=-1))
    scale, bias = jnp.asarray(scale), jnp.asarray(bias)
    num_groups = sum(widths) // 3
    ours = lambda parts, s, b: groupnorm.group_norm(
      parts, s, b, num_groups, 1e-6, act, recompute_dz=recompute
    )
    ref = lambda parts, s, b: reference(jnp.concatenate(parts, -1), s, b, num_groups, act)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    both = lambda f: jax.jit(lambda *a: (f(*a), jax.grad(loss(f), argnums=(0, 1, 2))(*a)))
    (out, grads), (want_out, expected) = (
      both(ours)(parts, scale, bias),
      both(ref)(parts, scale, bias),
    )
    np.testing.assert_allclose(out, want_out, rtol=1e-12)
    assert [g.shape for g in grads[0]] == [p.shape for p in parts]
    for actual, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(actual, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def test_bfloat16_activations_keep_float32_statistics():
  """bf16 in and out, float32 statistics: within bf16 rounding of the float64 result, even with
  a mean 8 standard deviations from zero (E[x^2] - E[x]^2 in float32 keeps ~1e-6 of the
  variance), and the gradients come back in the dtypes of x and the parameters."""
  x, scale, bias, w = inputs((2, 8, 8, 16), 0, offset=16.0)
  x16 = jnp.asarray(x, jnp.bfloat16)
  f = lambda x, s, b: groupnorm.group_norm(x, s, b, 4, 1e-6, "swish", jnp.bfloat16)
  args = (x16, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
  y, vjp = jax.vjp(f, *args)
  dx, dscale, dbias = vjp(jnp.asarray(w, jnp.bfloat16))
  assert (y.dtype, dx.dtype, dscale.dtype, dbias.dtype) == (jnp.bfloat16, jnp.bfloat16) + (
    jnp.float32,
  ) * 2
  with jax.enable_x64():
    args64 = (jnp.asarray(x16, jnp.float64), jnp.asarray(scale), jnp.asarray(bias))
    y64, vjp64 = jax.vjp(lambda *a: reference(*a, 4, "swish"), *args64)
    expected = (y64, *vjp64(jnp.asarray(w, jnp.bfloat16).astype(jnp.float64)))
  for actual, want, tol in zip(
    (y, dx, dscale, dbias), expected, (1e-2, 1e-2, 1e-4, 1e-4), strict=True
  ):
    actual, want = np.asarray(actual, np.float64), np.asarray(want)
    assert np.max(np.abs(actual - want)) <= tol * np.max(np.abs(want))


def test_module_has_flax_parameters_and_checks_its_arguments():
  x = jnp.ones((2, 4, 4, 12), jnp.float32)
  ours = layers.group_norm(4, jnp.float32, "norm", act="swish").init(jax.random.key(0), x)
  theirs = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
    lambda a: (a.shape, a.dtype), theirs
  )
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  with pytest.raises(ValueError, match="5 groups do not divide 12 channels"):
    groupnorm.GroupNorm(num_groups=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown act 'relu'; valid: none, swish"):
    groupnorm.GroupNorm(num_groups=4, act="relu").init(jax.random.key(0), x)


@pytest.mark.parametrize("act", ["none", "swish"])
def test_reference_module_is_flax_group_norm_in_float64(act):
  """`layers.ReferenceGroupNorm` (model.fast.group_norm="reference"): flax's GroupNorm then act,
  values and gradients, also when handed the input in parts along the channels."""
  x, scale, bias, w = inputs((2, 5, 5, 12), 11)
  module = layers.ReferenceGroupNorm(num_groups=3, act=act, param_dtype=jnp.float64)
  with jax.enable_x64():
    x, scale, bias, w = (jnp.asarray(a, jnp.float64) for a in (x, scale, bias, w))
    params = {"params": {"scale": scale, "bias": bias}}
    ours = lambda x, p: jnp.sum(module.apply(p, x) * w)
    theirs = lambda x, p: jnp.sum(
      reference(x, p["params"]["scale"], p["params"]["bias"], 3, act) * w
    )
    np.testing.assert_allclose(ours(x, params), theirs(x, params), rtol=1e-12)
    for a, b in zip(
      jax.tree.leaves(jax.grad(ours, (0, 1))(x, params)),
      jax.tree.leaves(jax.grad(theirs, (0, 1))(x, params)),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(b))))
    parts = (x[..., :5], x[..., 5:])
    np.testing.assert_allclose(module.apply(params, parts), module.apply(params, x), rtol=1e-12)
