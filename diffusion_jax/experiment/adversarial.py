"""LDM's adversarial term for the autoencoder (taming-transformers' LPIPSWithDiscriminator).

With autoencoder.disc_weight > 0 a PatchGAN discriminator D (`models/discriminator.py`) trains
beside the autoencoder. From step autoencoder.disc_start on:
  - the autoencoder's loss gains λ g_loss, g_loss = -mean D(x̂), with LDM's adaptive weight
    λ = disc_weight * ‖∇_L rec‖ / (‖∇_L g_loss‖ + 1e-4), clipped to [0, 1e4] and held constant,
    ∇_L the gradient with respect to the decoder's last convolution and rec the reconstruction
    term of the loss;
  - D minimises the hinge loss ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂))).
Before disc_start both terms are multiplied by 0, as LDM's adopt_weight does. Each step updates the
autoencoder, then D on the same batch's images and the reconstructions of that forward pass, with
Adam(β1 = 0.5, β2 = 0.9) at the run's learning-rate schedule (LDM's optimiser for D).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.experiment.optim import global_norm, learning_rate_schedule
from diffusion_jax.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from diffusion_jax.runtime.errors import ConfigError

# The decoder's last layer, whose gradients set the adaptive weight.
LAST_LAYER = ("decoder", "conv_out", "kernel")
_MAX_WEIGHT = 1e4


def enabled(section) -> bool:
  """Whether the config's `autoencoder` section trains a discriminator."""
  return section.disc_weight > 0


def check(section, image_size: int) -> None:
  """Raises ConfigError on an invalid adversarial field of the `autoencoder` section."""
  if section.disc_weight < 0:
    raise ConfigError(f"autoencoder.disc_weight={section.disc_weight} must be >= 0 (0: off)")
  if section.disc_start < 0:
    raise ConfigError(f"autoencoder.disc_start={section.disc_start} must be >= 0")
  for name in ("disc_channels", "disc_layers"):
    if section[name] < 1:
      raise ConfigError(f"autoencoder.{name}={section[name]} must be positive")
  smallest = 3 * 2**section.disc_layers  # the last two convolutions take 1 pixel each
  if enabled(section) and image_size < smallest:
    raise ConfigError(
      f"data.image_size={image_size} is too small for autoencoder.disc_layers="
      f"{section.disc_layers} (at least {smallest}); use fewer layers"
    )


def discriminator(section) -> PatchDiscriminator:
  return PatchDiscriminator(DiscriminatorConfig(section.disc_channels, section.disc_layers))


def optimizer(train_settings) -> optax.GradientTransformation:
  return optax.adam(learning_rate_schedule(train_settings), b1=0.5, b2=0.9)


def init_state(section, train_settings, image_shape, key: jax.Array) -> dict[str, Any]:
  """The discriminator's part of the train state: {"params", "opt_state"}."""
  params = discriminator(section).init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
  return {"params": params, "opt_state": optimizer(train_settings).init(params)}


class Adversary:
  """The generator's term and the discriminator's update of one step (pure functions)."""

  def __init__(self, section, train_settings):
    self.model = discriminator(section)
    self.tx = optimizer(train_settings)
    self.weight = float(section.disc_weight)
    self.start = int(section.disc_start)

  def generator_loss(self, params, reconstructions: jax.Array) -> jax.Array:
    """g_loss = -mean D(x̂)."""
    return -jnp.mean(self.model.apply({"params": params}, reconstructions))

  def adaptive_weight(self, rec_grads, g_grads, step: jax.Array) -> jax.Array:
    """λ of the step (0 before disc_start), from the two losses' gradients of the autoencoder."""

    def last(grads):
      node = grads
      for name in LAST_LAYER:
        node = node[name]
      return node

    ratio = global_norm(last(rec_grads)) / (global_norm(last(g_grads)) + 1e-4)
    weight = jnp.clip(ratio, 0.0, _MAX_WEIGHT) * self.weight
    return jnp.where(step >= self.start, weight, 0.0)

  def update(self, state: dict, images: jax.Array, reconstructions: jax.Array, step: jax.Array):
    """(the discriminator's new state, metrics): one hinge-loss step on real `images` and fake
    `reconstructions` (both [B, H, W, C] in [-1, 1]; no gradient reaches the autoencoder)."""
    fake = jax.lax.stop_gradient(reconstructions)
    factor = jnp.where(step >= self.start, 1.0, 0.0)

    def loss_fn(params):
      real_logits = self.model.apply({"params": params}, images)
      fake_logits = self.model.apply({"params": params}, fake)
      hinge = 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
      )
      return factor * hinge, (jnp.mean(real_logits), jnp.mean(fake_logits))

    (loss, (real, fake_mean)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"d_loss": loss, "logits_real": real, "logits_fake": fake_mean}
    return {"params": params, "opt_state": opt_state}, metrics
