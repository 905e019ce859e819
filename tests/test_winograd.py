"""Tests of the Winograd 3x3 convolution: agreement with XLA's convolution (outputs and both
gradients) for both tile sizes, the choice of algorithm, and the network's `model.conv` switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.models import layers
from diffusion_jax.models.fast import winograd

pytestmark = pytest.mark.usefixtures("fast_compile")


def direct(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=winograd._NHWC)


def scaled_error(actual, expected):
  """max |actual - expected| / max |expected|, in float64."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# F(2x2) rounds like the direct convolution; F(4x4)'s transforms scale by up to 8 and 1/24, so
# its rounding is about 10x larger (still float32 rounding: the direct result is in float64).
TOLERANCE = {2: 2e-6, 4: 2e-5}


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 8, 8, 5, 6), (1, 7, 10, 3, 4), (2, 1, 1, 2, 3)])
def test_winograd_equals_the_direct_convolution_in_float64(m, shape):
  """Exact arithmetic in float64: the algorithm itself, borders and ragged tiles included."""
  n, h, w, cin, cout = shape
  np_rng = np.random.default_rng(h * w + m)
  x = np_rng.normal(size=(n, h, w, cin))
  kernel = np_rng.normal(size=(3, 3, cin, cout))
  with jax.enable_x64():
    # Jitted: one program, where eager dispatch would compile each of the transforms' operations.
    actual = jax.jit(winograd.conv3x3, static_argnums=2)(jnp.asarray(x), jnp.asarray(kernel), m)
    expected = direct(jnp.asarray(x), jnp.asarray(kernel))
    assert actual.dtype == jnp.float64
    assert actual.shape == (n, h, w, cout)
    assert scaled_error(actual, expected) < 1e-12


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_gradients_match_within_float32_rounding(m):
  np_rng = np.random.default_rng(m)
  x = jnp.asarray(np_rng.normal(size=(2, 12, 9, 8)), jnp.float32)
  kernel = jnp.asarray(np_rng.normal(size=(3, 3, 8, 6)) / 8, jnp.float32)
  g = jnp.asarray(np_rng.normal(size=(2, 12, 9, 6)), jnp.float32)

  def output_and_gradients(x, kernel, g):
    y, vjp = jax.vjp(lambda x, k: winograd.conv3x3(x, k, m), x, kernel)
    return (y, *vjp(g))

  # One program: the output and both gradients.
  ours = jax.jit(output_and_gradients)(x, kernel, g)
  with jax.enable_x64():
    y64, vjp64 = jax.vjp(direct, x.astype(jnp.float64), kernel.astype(jnp.float64))
    expected = (y64, *vjp64(g.astype(jnp.float64)))
  for actual, reference in zip(ours, expected, strict=True):
    assert actual.dtype == jnp.float32
    assert scaled_error(actual, reference) < TOLERANCE[m]


def test_conv_general_dilated_picks_winograd_only_where_it_applies():
  def primitives(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}

  forced = functools.partial(winograd.conv_general_dilated, conv="winograd")
  f32, bf16 = jnp.float32, jnp.bfloat16
  same = lambda conv: lambda x, k: conv(x, k, (1, 1), "SAME", dimension_numbers=winograd._NHWC)
  # A float32 "SAME" 3x3 convolution with stride 1: Winograd, no convolution left.
  assert "conv_general_dilated" not in primitives(
    same(forced), ((1, 4, 4, 2), f32), ((3, 3, 2, 2), f32)
  )
  # Anything else goes to XLA's convolution.
  stride2 = lambda x, k: forced(x, k, (2, 2), "SAME", dimension_numbers=winograd._NHWC)
  for fn, shapes in [
    (stride2, (((1, 4, 4, 2), f32), ((3, 3, 2, 2), f32))),
    (same(forced), (((1, 4, 4, 2), bf16), ((3, 3, 2, 2), bf16))),
    (same(forced), (((1, 4, 4, 2), f32), ((1, 1, 2, 2), f32))),
    (
      same(functools.partial(winograd.conv_general_dilated, conv="xla")),
      (((1, 4, 4, 2), f32), ((3, 3, 2, 2), f32)),
    ),
  ]:
    assert "conv_general_dilated" in primitives(fn, *shapes)


def test_large_tiles_follow_the_work_per_image():
  f32 = jnp.float32
  large = "winograd_large"  # what model.conv="auto" becomes on a CPU
  # The DDPM CIFAR-10 network's ResBlock convolutions.
  assert winograd.tile_size(32, 32, 128, 128, f32, large) == 4
  assert winograd.tile_size(16, 16, 128, 256, f32, large) == 4
  assert winograd.tile_size(8, 8, 512, 256, f32, large) == 2
  assert winograd.tile_size(8, 8, 256, 256, f32, large) == 0
  # Too little work per image, maps too small, or not float32: XLA's convolution.
  assert winograd.tile_size(4, 4, 256, 256, f32, large) == 0
  assert winograd.tile_size(32, 32, 3, 128, f32, large) == 0
  assert winograd.tile_size(32, 32, 128, 128, jnp.bfloat16, large) == 0
  # An unresolved "auto" (a network built outside a run) is XLA's convolution everywhere.
  assert winograd.tile_size(32, 32, 128, 128, f32, "auto") == 0
  assert winograd.tile_size(32, 32, 128, 128, f32, "xla") == 0
  assert winograd.tile_size(4, 4, 2, 2, f32, "winograd") == 2
  assert winograd.tile_size(16, 16, 2, 2, f32, "winograd") == 4


def test_conv3x3_layer_keeps_its_parameters_under_every_algorithm():
  np_rng = np.random.default_rng(5)
  x = jnp.asarray(np_rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  modules = {conv: layers.conv3x3(5, jnp.float32, "conv", conv=conv) for conv in layers.CONV_IMPLS}
  inits = {conv: m.init(jax.random.key(3), x) for conv, m in modules.items()}
  for params in inits.values():  # The same names, shapes and initial values: checkpoints load.
    assert jax.tree.structure(params) == jax.tree.structure(inits["xla"])
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(inits["xla"]), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
  params = jax.tree.map(
    lambda p: jnp.asarray(np_rng.normal(size=p.shape), jnp.float32), inits["xla"]
  )
  outputs = {conv: m.apply(params, x) for conv, m in modules.items()}
  assert scaled_error(outputs["winograd"], outputs["xla"]) < TOLERANCE[2]
  # The output differs from XLA's by rounding: Winograd really ran.
  assert not np.array_equal(outputs["winograd"], outputs["xla"])
