"""The PatchGAN discriminator of latent diffusion's autoencoder training (Isola et al. 2017, as
LDM and taming-transformers' `NLayerDiscriminator`).

An image [B, H, W, 3] in [-1, 1] -> a logit per overlapping patch [B, H/8 - 2, W/8 - 2, 1] (for
3 layers): a stride-2 4x4 conv and LeakyReLU(0.2), then layers - 1 more stride-2 convs and one of
stride 1, each with batch normalisation and LeakyReLU, and a final stride-1 conv to one channel.
Widths double per layer up to 8 times `channels`. Batch normalisation always uses the statistics
of the batch at hand (the discriminator is used in training only), so it keeps no state.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# taming-transformers' weights_init: N(0, 0.02) for convolutions, N(1, 0.02) for the BN scales.
_conv_init = nn.initializers.normal(0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  channels: int = 64  # the first layer's width (LDM's ndf)
  num_layers: int = 3  # stride-2 convolutions (LDM's n_layers)

  def __post_init__(self):
    if self.channels < 1 or self.num_layers < 1:
      raise ValueError(
        f"DiscriminatorConfig.channels={self.channels} and num_layers={self.num_layers} must "
        "be positive"
      )


class BatchStatsNorm(nn.Module):
  """Batch normalisation by the statistics of the batch at hand (PyTorch's BatchNorm2d in
  training mode: biased variance, eps 1e-5), with a learned scale and bias per channel."""

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", _bn_scale_init, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class PatchDiscriminator(nn.Module):
  """LDM's NLayerDiscriminator; parameters named after its `main` Sequential's indices."""

  config: DiscriminatorConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, 3] images in [-1, 1] -> [B, h, w, 1] patch logits (float32)."""
    cfg = self.config
    pad = ((1, 1), (1, 1))

    def conv(features, strides, index, bias):
      return nn.Conv(
        features,
        (4, 4),
        strides=strides,
        padding=pad,
        use_bias=bias,
        kernel_init=_conv_init,
        name=f"main_{index}",
      )

    h = nn.leaky_relu(conv(cfg.channels, 2, 0, True)(x), 0.2)
    index = 2
    for n in range(1, cfg.num_layers + 1):
      strides = 2 if n < cfg.num_layers else 1
      h = conv(cfg.channels * min(2**n, 8), strides, index, False)(h)
      h = nn.leaky_relu(BatchStatsNorm(name=f"main_{index + 1}")(h), 0.2)
      index += 3
    return conv(1, 1, index, True)(h).astype(jnp.float32)
