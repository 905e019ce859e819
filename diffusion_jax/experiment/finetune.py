"""Fine-tuning Stable Diffusion from published weights (model.name="stable_diffusion",
configs/stable_diffusion_finetune.py): the U-Net trains on a captioned folder through the
project's trainer (checkpoints, resume, metrics, seeds, devices), starting from
`config.pretrained`; the text encoder and the VAE stay frozen, and the loss uses the checkpoint's
own schedule and prediction type (the config's `diffusion` section is not read).

Each step's latents are the VAE's posterior draws times its scaling factor (`latent.LatentSpace`,
stream LATENT, as latent runs draw them); captions become CLIP token ids in the data pipeline and
the frozen text encoder's context inside the step; a caption is replaced by the empty prompt with
probability train.cond_drop_prob, which keeps the unconditional model that guidance uses.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import data, pretrained
from diffusion_jax.core import losses, rng
from diffusion_jax.experiment import latent, settings
from diffusion_jax.experiment.optim import make_optimizer
from diffusion_jax.experiment.train_step import TrainState, apply_gradients
from diffusion_jax.runtime import checkpoints, parallel
from diffusion_jax.runtime.errors import ConfigError

STABLE_DIFFUSION = settings.STABLE_DIFFUSION
_DROP_STREAM = 7  # the caption-dropout draw of each example's key


def is_finetune(config: ml_collections.ConfigDict) -> bool:
  return config.model.name == STABLE_DIFFUSION


class ClipCaptions:
  """The data pipeline's tokenizer interface over CLIP's BPE tokenizer: captions -> [77] ids."""

  def __init__(self, tokenizer):
    self.clip = tokenizer
    self.max_length = tokenizer.max_length

  def __len__(self) -> int:
    return self.clip.vocab_size

  def encode_one(self, caption: str) -> np.ndarray:
    return self.clip([caption])[0]

  def encode(self, prompts, *, warn: bool = True) -> np.ndarray:
    return self.clip(list(prompts))


def _check(config: ml_collections.ConfigDict, pipe, image_size: int) -> None:
  if not isinstance(pipe, pretrained.StableDiffusion):
    raise ConfigError(
      f"model.name={STABLE_DIFFUSION!r} fine-tunes Stable Diffusion, but config.pretrained="
      f"{config.pretrained!r} is another kind of model"
    )
  factor = pipe.vae_factor * 2 ** (len(pipe.unet_model.config.block_channels) - 1)
  if image_size % factor:
    raise ConfigError(
      f"data.image_size={image_size} must be a multiple of {factor} for this U-Net and VAE"
    )
  for field, why in (
    ("num_grid_samples", "draw with --mode=sample, which reads the run's latest checkpoint"),
    ("steps_per_call", "one step per call"),
  ):
    allowed = 1 if field == "steps_per_call" else 0
    if config.train[field] != allowed:
      raise ConfigError(f"train.{field} must be {allowed} when fine-tuning ({why})")
  if settings.study_seeds(config) is not None:
    raise ConfigError("config.seeds: fine-tuning trains one seed per run")
  if config.latent.cache:
    raise ConfigError("latent.cache: fine-tuning encodes each step's images on the fly")


def make_run(config: ml_collections.ConfigDict, mesh):
  """The `run.Run` of a fine-tuning config, its network and frozen parts loaded from
  config.pretrained.

  Raises:
    ConfigError: no or unfitting weights, a data set without captions, settings fine-tuning
      does not have.
  """
  from diffusion_jax.experiment import pretrained_mode
  from diffusion_jax.experiment.run import Run

  pipe = pretrained_mode.load_pipeline(config)
  data_config = settings.from_section(data.DataConfig, config.data, "data")
  _check(config, pipe, data_config.image_size)
  settings.check_config(config, mesh)
  source = data.make_source(data_config)
  if not getattr(source, "captioned", False):
    raise ConfigError(
      f"fine-tuning reads captions: data.dataset={config.data.dataset!r} has none (use a "
      "captioned folder: data.dataset=folder, data.path=DIR with metadata.jsonl or .txt files)"
    )
  captions = [source.caption(i, None) for i in range(len(source))]
  long = int(np.sum(pipe.tokenizer.lengths(captions) > pipe.tokenizer.max_length))
  if long:
    logging.warning("%d of %d captions are longer than 77 CLIP tokens: cut", long, len(captions))
  size = data_config.image_size // pipe.vae_factor
  replicated = parallel.replicated(mesh)
  space = latent.LatentSpace(
    pipe.vae_model, jax.device_put(pipe.params["vae"], replicated), pipe.scaling_factor, mesh
  )
  train = settings.from_section(settings.TrainSettings, config.train, "train")
  return Run(
    config=config,
    train=train,
    diffusion=settings.from_section(settings.DiffusionSettings, config.diffusion, "diffusion"),
    sample=settings.from_section(settings.SampleSettings, config.sample, "sample"),
    data=data_config,
    model=pipe.unet_model,
    schedule=pipe.schedule,
    mesh=mesh,
    tx=make_optimizer(train),
    image_shape=(size, size, pipe.latent_channels),
    cond_kind="text",
    tokenizer=ClipCaptions(pipe.tokenizer),
    latent=space,
    grid_captions=tuple(dict.fromkeys(captions))[:8],
    pretrained=pipe,
  )


def init_state(run) -> TrainState:
  """Step 0: the published U-Net's parameters (and as the EMA's start)."""
  params = run.pretrained.params["unet"]
  ema = jax.tree.map(jnp.copy, params)  # buffers of their own: the step donates both
  state = TrainState(jnp.zeros((), jnp.int32), params, ema, opt_state=run.tx.init(params))
  return jax.device_put(state, parallel.replicated(run.mesh))


def make_step(run):
  """The pure step (state, batch, train_key, frozen) -> (state, metrics) and its frozen input
  (the text encoder's parameters)."""
  pipe = run.pretrained
  unet, text_model = pipe.unet_model, pipe.text_model
  null = jnp.asarray(pipe.tokenizer([""])[0])
  prediction = pipe.scheduler.prediction
  drop_prob = run.train.cond_drop_prob

  def step(state: TrainState, batch, train_key, frozen):
    x0 = batch["latent"]
    keys = rng.example_keys(jax.random.fold_in(train_key, state.step), jnp.arange(x0.shape[0]))
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _DROP_STREAM)))(keys)
    tokens = jnp.where((u < drop_prob)[:, None], null[None], batch["tokens"])
    context = jax.lax.stop_gradient(text_model.apply({"params": frozen}, tokens))

    def loss_fn(params):
      denoise_fn = lambda x_t, t: unet.apply({"params": params}, x_t, t, context)
      per_example, _ = losses.loss_per_example_keys(
        run.schedule, denoise_fn, x0, keys, loss_type="simple", prediction=prediction
      )
      return jnp.mean(per_example)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, metrics = apply_gradients(state, grads, run.tx, run.train, param_norm=False)
    return new_state, {"loss": loss, **metrics}

  return step, pipe.params["text"]


def latest_unet(config: ml_collections.ConfigDict, workdir: str):
  """(EMA U-Net parameters, step) of a fine-tuning run's latest checkpoint in `workdir`, or
  (None, None) when `config` fine-tunes nothing or the workdir has no checkpoint yet."""
  directory = os.path.join(workdir, "checkpoints")
  if not is_finetune(config) or not os.path.isdir(directory) or not os.listdir(directory):
    return None, None
  from diffusion_jax.experiment import run as run_lib

  run = run_lib.make_run(config)
  store = checkpoints.CheckpointStore(directory)
  try:
    state = run_lib.restore_or_init(run, store)
  finally:
    store.close()
  return state.ema_params, int(state.step)
