"""Tests for diffusion_jax.models.autoencoder: the diagonal Gaussian against float64 NumPy, shapes
for f = 4 and 8, LDM's parameter names and Stable Diffusion's parameter count, config errors, and
ResBlocks without a timestep embedding."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models import layers
from diffusion_jax.models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian

# Stable Diffusion's VAE (diffusers' AutoencoderKL, LDM's kl-f8).
SD_VAE_NUM_PARAMS = 83_653_863

TINY = dict(channels=8, num_res_blocks=1, num_groups=4)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def _random_params(module, *args, seed=0):
  """Parameters of `module.init(key, *args)`'s shapes drawn with NumPy (no compiled init), all
  non-zero so that every branch contributes: kernels N(0, 1 / fan_in), scales 1 + N(0, 0.01),
  biases N(0, 0.01)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.normal(0, 1, leaf.shape)
    if name == "kernel":
      noise /= math.sqrt(math.prod(leaf.shape[:-1]))
    else:
      noise = 0.1 * noise + (name == "scale")
    return jnp.asarray(noise, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _init(config: AutoencoderConfig, shape: tuple[int, ...]):
  model = Autoencoder(config)
  return model, _random_params(model, jnp.zeros(shape))


def _paths(variables) -> set[str]:
  return set(flax.traverse_util.flatten_dict(variables["params"], sep="/"))


def test_kl_and_nll_match_float64_numpy():
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 2, (3, 4, 5, 4))
  # Some log-variances outside [-30, 20], which are clipped.
  logvar = rng.uniform(-40, 25, (3, 4, 5, 4))
  moments = jnp.asarray(np.concatenate([mean, logvar], axis=-1), jnp.float32)
  posterior = DiagonalGaussian.from_moments(moments)

  clipped = np.clip(logvar, -30, 20)
  var = np.exp(clipped)
  kl = 0.5 * np.sum(mean**2 + var - 1 - clipped, axis=(1, 2, 3))
  x = rng.normal(0, 1, mean.shape)
  nll = 0.5 * np.sum(np.log(2 * np.pi) + clipped + (x - mean) ** 2 / var, axis=(1, 2, 3))

  assert posterior.kl().shape == (3,)
  np.testing.assert_allclose(posterior.logvar, clipped, rtol=1e-6)
  np.testing.assert_allclose(posterior.std, np.exp(0.5 * clipped), rtol=1e-5)
  np.testing.assert_allclose(posterior.kl(), kl, rtol=1e-5)
  np.testing.assert_allclose(posterior.nll(jnp.asarray(x, jnp.float32)), nll, rtol=1e-4)


def test_kl_of_the_standard_normal_is_zero():
  posterior = DiagonalGaussian.from_moments(jnp.zeros((2, 3, 3, 8)))
  np.testing.assert_array_equal(posterior.kl(), np.zeros(2))


def test_sample_has_the_posterior_mean_and_std():
  rng = np.random.default_rng(1)
  mean = jnp.asarray(rng.normal(0, 3, (4, 32, 32, 4)), jnp.float32)
  logvar = jnp.asarray(rng.uniform(-4, 4, mean.shape), jnp.float32)
  posterior = DiagonalGaussian(mean=mean, logvar=logvar)
  z = posterior.sample(jax.random.key(3))
  eps = np.asarray((z - mean) / posterior.std, np.float64)
  n = eps.size
  # Standard errors of the mean and of the variance of n standard normal draws.
  assert abs(eps.mean()) < 5 / math.sqrt(n)
  assert abs(eps.var() - 1) < 5 * math.sqrt(2 / n)
  assert not np.array_equal(z, posterior.sample(jax.random.key(4)))
  np.testing.assert_array_equal(posterior.mode(), mean)


@pytest.mark.parametrize(
  "channel_mult, attn_resolutions, image",
  [((1, 2, 2), (), (2, 16, 16, 3)), ((1, 1, 2, 2), (4,), (1, 16, 24, 3))],
)
def test_shapes(channel_mult, attn_resolutions, image):
  config = AutoencoderConfig(channel_mult=channel_mult, attn_resolutions=attn_resolutions, **TINY)
  f = config.downsample_factor
  assert f == 2 ** (len(channel_mult) - 1)
  model, variables = _init(config, image)
  x = _images(image)
  b, h, w, _ = image
  assert config.latent_shape((h, w)) == (h // f, w // f, 4)

  key = jax.random.key(7)

  @jax.jit
  def run(variables, x):
    posterior = model.apply(variables, x, method=Autoencoder.encode)
    decode = functools.partial(model.apply, variables, method=Autoencoder.decode)
    # The whole model decodes the mode without a key, a sample with one.
    whole = model.apply(variables, x), model.apply(variables, x, key)
    return posterior, decode(posterior.mode()), decode(posterior.sample(key)), whole

  posterior, image_of_mode, image_of_sample, whole = run(variables, x)
  (reconstruction, again), (sampled, _) = whole
  assert posterior.mean.shape == posterior.logvar.shape == (b, h // f, w // f, 4)
  assert image_of_mode.shape == image and image_of_mode.dtype == jnp.float32
  np.testing.assert_allclose(reconstruction, image_of_mode, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(again.mean, posterior.mean)
  np.testing.assert_allclose(sampled, image_of_sample, rtol=1e-5, atol=1e-5)
  assert not np.allclose(sampled, reconstruction)
  if attn_resolutions:
    names = _paths(variables)
    # 16x24 images: level 2 of the encoder and the decoder runs at height 4.
    assert {"encoder/down_2_attn_0/q/kernel", "decoder/up_2_attn_1/proj_out/kernel"} <= names
    assert not any("down_1_attn" in n or "up_1_attn" in n for n in names)


def test_parameter_names_follow_ldm():
  config = AutoencoderConfig(channels=8, channel_mult=(1, 2), num_res_blocks=2, num_groups=4)
  _, variables = _init(config, (1, 8, 8, 3))
  names = _paths(variables)
  assert set(variables["params"]) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
  expected = {
    "encoder/conv_in/kernel",
    "encoder/down_0_block_0/conv1/kernel",
    "encoder/down_0_block_1/norm2/scale",
    "encoder/down_0_downsample/conv/kernel",
    "encoder/down_1_block_0/nin_shortcut/kernel",
    "encoder/mid_block_1/conv2/kernel",
    "encoder/mid_attn_1/q/kernel",
    "encoder/mid_block_2/norm1/bias",
    "encoder/norm_out/scale",
    "encoder/conv_out/kernel",
    "decoder/conv_in/kernel",
    "decoder/mid_attn_1/proj_out/kernel",
    "decoder/up_1_block_2/conv1/kernel",
    "decoder/up_1_upsample/conv/kernel",
    "decoder/up_0_block_0/nin_shortcut/kernel",
    "decoder/up_0_block_2/conv2/kernel",
    "decoder/conv_out/kernel",
    "quant_conv/kernel",
    "post_quant_conv/kernel",
  }
  assert expected <= names, expected - names
  assert not any("temb" in n for n in names)
  # The last level has no Downsample, the first no Upsample; each decoder level has 3 blocks.
  assert not any(s in n for n in names for s in ("down_1_downsample", "up_0_upsample"))
  assert not any("block_3" in n or "down_0_block_2" in n for n in names)
  params = variables["params"]
  assert params["encoder"]["conv_out"]["kernel"].shape == (3, 3, 16, 8)
  assert params["quant_conv"]["kernel"].shape == (8, 8)
  assert params["post_quant_conv"]["kernel"].shape == (4, 4)
  assert params["decoder"]["conv_in"]["kernel"].shape == (3, 3, 4, 16)
  assert params["decoder"]["up_0_block_0"]["conv1"]["kernel"].shape == (3, 3, 16, 8)


def test_stable_diffusion_parameter_count():
  config = AutoencoderConfig()
  assert config.downsample_factor == 8 and config.latent_shape(512) == (64, 64, 4)
  shapes = jax.eval_shape(Autoencoder(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(shapes)) == SD_VAE_NUM_PARAMS


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(channels=12, num_groups=8), r"num_groups=8 does not divide 12"),
    (dict(channels=4, channel_mult=(2, 3), num_groups=8), r"channel_mult\[1\]"),
    (dict(channel_mult=()), r"channel_mult=\(\) must be a non-empty"),
    (dict(z_channels=0), r"z_channels=0 must be a positive"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dtype="float64"), r"dtype='float64' is not one of"),
  ],
)
def test_bad_config_raises(fields, match):
  with pytest.raises(ValueError, match=match):
    AutoencoderConfig(**fields)


def test_image_size_not_divisible_raises():
  config = AutoencoderConfig(channel_mult=(1, 1, 1, 1), **TINY)
  with pytest.raises(ValueError, match=r"image size 12 is not a multiple of .* factor 8"):
    config.latent_shape((16, 12))
  with pytest.raises(ValueError, match=r"image size 20 is not a multiple"):
    jax.eval_shape(Autoencoder(config).init, jax.random.key(0), jnp.zeros((1, 20, 16, 3)))


def test_package_exports():
  assert models.Autoencoder is Autoencoder
  assert models.AutoencoderConfig is AutoencoderConfig
  assert models.DiagonalGaussian is DiagonalGaussian


def test_resblock_without_temb():
  x = _images((2, 8, 8, 8))
  temb = jax.random.normal(jax.random.key(1), (2, 16))
  block = layers.ResBlock(16, num_groups=4)
  with_temb = _random_params(block, x, temb)["params"]
  params = _random_params(block, x, None)["params"]
  assert "temb_proj" in with_temb and "temb_proj" not in params
  assert set(with_temb) - {"temb_proj"} == set(params)

  # A temb projection with a zero kernel and bias b is conv1's bias shifted by b.
  bias = jax.random.normal(jax.random.key(4), (16,))
  temb_proj = {"kernel": jnp.zeros((16, 16)), "bias": bias}
  shifted = {**params, "conv1": {**params["conv1"], "bias": params["conv1"]["bias"] + bias}}
  y_temb = block.apply({"params": {**params, "temb_proj": temb_proj}}, x, temb)
  y_none = block.apply({"params": shifted}, x, None)
  np.testing.assert_allclose(y_temb, y_none, rtol=1e-5, atol=1e-5)
  # The embedding still reaches the output when given.
  moved = {**temb_proj, "kernel": jnp.ones((16, 16))}
  assert not np.allclose(block.apply({"params": {**params, "temb_proj": moved}}, x, temb), y_temb)
