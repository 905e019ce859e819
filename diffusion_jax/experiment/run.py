"""A run: the config validated and turned into frozen settings, the model, schedule, mesh and
optimizer, and the train state restored from a workdir or freshly initialised.

Fast paths set to "auto" are resolved here, once, from the backend (`resolve_fast_paths`).
"""

import copy
import dataclasses
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from diffusion_jax import data, text
from diffusion_jax.core import rng
from diffusion_jax.core.schedules import Schedule, make_schedule
from diffusion_jax.experiment import (
  adversarial,
  autoencoder,
  generate,
  latent,
  low_res_inputs,
  settings,
)
from diffusion_jax.experiment.optim import make_optimizer
from diffusion_jax.experiment.train_step import TrainState, init_state
from diffusion_jax.models import condition_kind, fast, make_model
from diffusion_jax.models.autoencoder import Autoencoder
from diffusion_jax.runtime import checkpoints, parallel
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import guidance


def schedule_from_config(diffusion_config: settings.DiffusionSettings) -> Schedule:
  """The noise schedule named by the config's `diffusion` section."""
  kwargs = {}
  if diffusion_config.schedule == "linear":
    kwargs = dict(beta_start=diffusion_config.beta_start, beta_end=diffusion_config.beta_end)
  elif diffusion_config.schedule == "cosine":
    kwargs = dict(s=diffusion_config.cosine_s)
  try:
    return make_schedule(diffusion_config.schedule, diffusion_config.num_timesteps, **kwargs)
  except ValueError as e:
    raise ConfigError(f"diffusion.schedule / diffusion.num_timesteps: {e}") from e


@dataclasses.dataclass
class Run:
  """What the loop and the sample mode share: the model, schedule, mesh and compiled functions."""

  config: ml_collections.ConfigDict  # with every "auto" resolved (`resolve_auto`)
  train: settings.TrainSettings
  diffusion: settings.DiffusionSettings
  sample: settings.SampleSettings
  data: data.DataConfig
  model: nn.Module
  schedule: Schedule
  mesh: Any
  tx: optax.GradientTransformation
  image_shape: tuple[int, int, int]
  # What the model is conditioned on (`models.CONDITIONING`), the null label of a
  # class-conditional model, and the prompt tokenizer of a text-conditional one.
  cond_kind: str = "none"
  num_classes: int = 0
  tokenizer: text.Tokenizer | None = None
  class_names: tuple[str, ...] = ()
  # A latent run's frozen autoencoder (`latent.LatentSpace`); None in pixel space.
  latent: Any = None
  # A captioned folder's first distinct captions: what its training-time grids draw.
  grid_captions: tuple[str, ...] = ()
  # A fine-tuning run's published model (`pretrained.StableDiffusion`, `finetune.py`).
  pretrained: Any = None
  # A super-resolution model's input size (model.low_res_size; 0: none) and its `sr` section.
  low_res_size: int = 0
  sr: settings.SuperResSettings | None = None

  @property
  def is_autoencoder(self) -> bool:
    """Whether the run trains the autoencoder of latent diffusion (`experiment/autoencoder.py`)."""
    return self.config.model.name == settings.AUTOENCODER

  def init_state(self, key: jax.Array) -> TrainState:
    """`init_state` for this run's model, optimizer and t sampling."""
    if self.pretrained is not None:
      from diffusion_jax.experiment import finetune  # It builds on this module.

      return finetune.init_state(self)
    if self.is_autoencoder:
      params = autoencoder.init_params(self.model, self.image_shape, key)
      step = jnp.zeros((), jnp.int32)
      section = self.config.autoencoder
      disc = None
      if adversarial.enabled(section):
        disc_key = jax.random.fold_in(key, 1)
        disc = adversarial.init_state(section, self.train, self.image_shape, disc_key)
      return TrainState(step, params, params, opt_state=self.tx.init(params), discriminator=disc)
    importance_sampling = self.diffusion.t_sampling == "importance"
    example = self.prompt_condition([""]) if self.cond_kind != "none" else {}
    if self.low_res_size:
      low_res_shape = (1, self.low_res_size, self.low_res_size, self.image_shape[-1])
      example = {**example, "low_res": jnp.zeros(low_res_shape), "aug_level": jnp.zeros(1)}
    return init_state(
      self.model,
      self.tx,
      self.image_shape,
      key,
      t_history_size=self.schedule.num_timesteps if importance_sampling else None,
      example_condition=example or None,
    )

  def grid_prompts(self, num_images: int):
    """What a training-time sample grid shows: (prompts or None, condition or None, count).

    An unconditional model draws `num_images` images; a conditional one about as many, spread
    evenly over one prompt per class (at least one image each), with guidance as configured.
    A super-resolution model enlarges data images (`with_low_res`).
    """
    if self.cond_kind == "none":
      return None, self.with_low_res(None, [None] * num_images), num_images
    prompts = list(self.grid_captions) or [text.class_caption(n) for n in self.class_names]
    per_prompt = max(1, num_images // len(prompts))
    condition = self.prompt_condition(prompts)
    condition = {k: np.repeat(v, per_prompt, axis=0) for k, v in condition.items()}
    condition = self.with_low_res(condition, [p for p in prompts for _ in range(per_prompt)])
    return prompts, condition, per_prompt * len(prompts)

  def with_low_res(self, condition: dict | None, prompts: list[str | None]) -> dict | None:
    """`condition` (of len(prompts) examples) with a super-resolution model's "low_res": example
    j gets the next training image of the class prompt j names (as a class name or caption), or
    the next image in order (None, or a prompt naming no class), averaged over blocks. Other
    models: `condition` as it is."""
    if not self.low_res_size:
      return condition
    labels = [_prompt_class(p, self.class_names) for p in prompts]
    factor = self.image_shape[0] // self.low_res_size
    low_res = low_res_inputs.from_data(data.make_source(self.data), labels, factor)
    return {**(condition or {}), "low_res": low_res}

  def prompt_condition(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """The condition of each prompt: token ids (text), or the label of the class it names.

    An empty prompt is the null condition (an unconditional sample). A text prompt with
    unknown words is used with a warning (`text.Tokenizer.encode`).

    Raises:
      ConfigError: a class-conditional model is given a prompt that names no class.
    """
    if self.cond_kind == "text":
      return {"tokens": self.tokenizer.encode(prompts)}
    if self.cond_kind == "class":
      try:
        return {"labels": guidance.class_labels(prompts, self.class_names)}
      except ValueError as e:
        raise ConfigError(f"sample.prompt: {e}") from e
    if any(prompts):
      raise ConfigError("sample.prompt: this model is unconditional; it takes no prompt")
    return {}

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes, replicated over the mesh, without computing anything."""
    shapes = jax.eval_shape(self.init_state, jax.random.key(0))
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

  def sample_fn(self, **options):
    """`generate.make_sample_fn` for the config's sample section; `options` (to_uint8, or the
    sampler's: sampler, num_steps, ...) replace the section's values."""
    sample = self.sample
    kwargs = dict(
      sampler=sample.sampler,
      num_steps=sample.num_steps,
      eta=sample.eta,
      skip=sample.skip,
      variance=self.diffusion.variance,
      clip_x0=self.diffusion.clip_x0,
      threshold=settings.x0_threshold(self.diffusion),
      threshold_percentile=float(self.diffusion.threshold_percentile),
      prediction=self.diffusion.prediction,
      guidance_scale=float(sample.guidance_scale),
      num_classes=self.num_classes,
      microbatch=self.config.model.microbatch,
      aug_level=float(self.sr.aug_level) if self.low_res_size else 0.0,
    )
    options = {**kwargs, **options}
    to_uint8 = options.pop("to_uint8", True)
    fn = generate.make_sample_fn(
      self.model,
      self.schedule,
      self.image_shape,
      sample.batch_size,
      self.mesh,
      to_uint8=to_uint8 and self.latent is None,
      **options,
    )
    # A latent run's samples are decoded to pixels (to_uint8=False: the latents themselves).
    return self.latent.decoding(fn) if self.latent is not None and to_uint8 else fn

  def grid_sampler(self) -> tuple[dict, str]:
    """(sampler options, file-name suffix) of the training-time preview grids."""
    train, num_timesteps = self.train, self.schedule.num_timesteps
    return settings.grid_sampler(train.grid_sampler, train.grid_num_steps, num_timesteps)


def resolve_auto(config: ml_collections.ConfigDict, backend: str) -> ml_collections.ConfigDict:
  """A copy of `config` with every "auto" speed setting replaced by its choice for `backend`.

  Covers model.conv, model.fast.* and train.seed_batching; logs the choices in one line. The
  model code only ever sees the resolved values, which the run's config.json records.
  """
  config = copy.deepcopy(config)
  chosen = []

  def pick(section, name, value, label):
    if value != section[name]:
      section[name] = value
      chosen.append(f"{label}={value}")

  for name in fast.AUTO:
    value = fast.resolve(name, config.model.fast[name], backend)
    pick(config.model.fast, name, value, f"model.fast.{name}")
  pick(config.model, "conv", fast.resolve("conv", config.model.conv, backend), "model.conv")
  if config.train.seed_batching == "auto":
    table = settings.SEED_BATCHING_AUTO
    pick(config.train, "seed_batching", table.get(backend, table["other"]), "train.seed_batching")
  if chosen:
    logging.info("auto settings on the %s backend: %s", backend, ", ".join(chosen))
  return config


def make_run(config: ml_collections.ConfigDict) -> Run:
  """Validates `config` and builds everything that does not depend on the data or the state.

  "auto" settings are resolved here, from the backend, once (`resolve_auto`); `Run.config` holds
  the resolved config.
  """
  for section, name in (("model", "fast"), ("model", "conv"), ("train", "seed_batching")):
    if name not in config[section]:
      raise ConfigError(
        f"the config has no field {section}.{name}; build configs on configs/default.py"
      )
  config = resolve_auto(config, jax.default_backend())
  mesh = parallel.make_mesh()
  if config.model.name == settings.STABLE_DIFFUSION:
    from diffusion_jax.experiment import finetune  # It builds on this module.

    return finetune.make_run(config, mesh)
  space = None
  if settings.is_latent(config):
    config, space = latent.latent_space(config, mesh)
  settings.check_config(config, mesh)
  if config.model.name == settings.AUTOENCODER:
    autoencoder.check_config(config)
  train = settings.from_section(settings.TrainSettings, config.train, "train")
  diffusion = settings.from_section(settings.DiffusionSettings, config.diffusion, "diffusion")
  sample = settings.from_section(settings.SampleSettings, config.sample, "sample")
  data_config = settings.from_section(data.DataConfig, config.data, "data")
  image_size = settings.network_image_size(config)
  channels = config.autoencoder.z_channels if space else 3
  cond_kind = condition_kind(config.model)
  if train.steps_per_call > 1 and jax.default_backend() == "cpu":
    logging.warning(
      "train.steps_per_call=%d on a CPU: XLA:CPU runs the convolution gradients inside the "
      "step loop on a slow path (about 15x slower steps, benchmarks/results/fast_paths.md); it "
      "pays off on GPUs and TPUs only. Set --config.train.steps_per_call=1 here.",
      train.steps_per_call,
    )
  tokenizer, class_names, grid_captions = None, (), ()
  if cond_kind != "none":
    source = data.make_source(data_config)
    class_names = tuple(source.class_names)
    if cond_kind == "class" and config.model.num_classes != source.num_classes:
      raise ConfigError(
        f"model.num_classes={config.model.num_classes} but data.dataset="
        f"{config.data.dataset!r} has {source.num_classes} classes; set model.num_classes="
        f"{source.num_classes}"
      )
    if cond_kind == "text":
      if config.data.random_flip and config.data.dataset == "shapes":
        logging.warning(
          "data.random_flip=True with captions that name positions: a flipped image keeps the "
          "caption of the unflipped one, so 'left' and 'right' are wrong for half of them; set "
          "--config.data.random_flip=false"
        )
      tokenizer = text.tokenizer_for(source, config.model.text.max_length)
      if getattr(source, "captioned", False):
        captions = [source.caption(i, None) for i in range(len(source))]
        _warn_long_captions(captions, tokenizer.max_length)
        grid_captions = tuple(dict.fromkeys(captions))[:_GRID_CAPTIONS]
      if len(tokenizer) > config.model.text.vocab_size:
        raise ConfigError(
          f"model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
          f"{len(tokenizer)} tokens of the captions of data.dataset={config.data.dataset!r}; "
          f"set it to at least {len(tokenizer)}"
        )
  return Run(
    config=config,
    train=train,
    diffusion=diffusion,
    sample=sample,
    data=data_config,
    model=_make_network(config),
    schedule=schedule_from_config(diffusion),
    mesh=mesh,
    tx=make_optimizer(train),
    image_shape=(image_size, image_size, channels),
    cond_kind=cond_kind,
    num_classes=int(config.model.num_classes),
    tokenizer=tokenizer,
    class_names=class_names,
    latent=space,
    grid_captions=grid_captions,
    low_res_size=int(config.model.low_res_size),
    sr=settings.from_section(settings.SuperResSettings, config.sr, "sr"),
  )


def _prompt_class(prompt: str | None, class_names: tuple[str, ...]) -> int | None:
  """The class a prompt names (its name or caption, any case), or None."""
  key = " ".join((prompt or "").lower().split())
  for i, name in enumerate(class_names):
    if key in (name.lower(), text.class_caption(name).lower()):
      return i
  return None


def _warn_long_captions(captions: list[str], max_length: int) -> None:
  """One warning when captions have more words than the prompts hold (START takes one place)."""
  lengths = np.asarray([len(text.split_words(c)) for c in captions])
  long = int(np.sum(lengths > max_length - 1))
  if long:
    logging.warning(
      "%d of %d captions have more than %d words (the longest %d); training reads their first "
      "%d. Raise model.text.max_length (now %d) to keep them whole",
      long,
      len(captions),
      max_length - 1,
      int(lengths.max()),
      max_length - 1,
      max_length,
    )


_GRID_CAPTIONS = 8  # distinct captions in a captioned folder's training-time grids


def _make_network(config: ml_collections.ConfigDict) -> nn.Module:
  if config.model.name == settings.AUTOENCODER:
    return Autoencoder(autoencoder.autoencoder_config(config.autoencoder, config.model))
  return make_model(config.model)


def load(workdir: str) -> tuple[Run, TrainState]:
  """The run in `workdir`, rebuilt from its config.json, and its latest checkpoint's state.

  Example:
    run, state = load("runs/shapes")
    sample_fn = run.sample_fn(sampler="dpm_solver++", num_steps=20)
    images = generate.generate(sample_fn, state.ema_params, jax.random.key(0), 16, 64)

  Raises:
    ConfigError: no config.json or no checkpoint in `workdir`.
  """
  from diffusion_jax.experiment import saved_config

  run = make_run(saved_config.get_config(workdir))
  directory = os.path.join(workdir, "checkpoints")
  store = checkpoints.CheckpointStore(directory)
  try:
    if store.latest_step() is None:
      raise ConfigError(f"--workdir={workdir} has no checkpoint; train first (--mode=train)")
    return run, restore_or_init(run, store)
  finally:
    store.close()


def restore_or_init(run: Run, store: checkpoints.CheckpointStore) -> TrainState:
  """The latest readable checkpoint's state, or a fresh one from the init stream."""
  return restore_or_init_seeds(run, [store], [run.config.seed])[0]


def restore_or_init_seeds(
  run: Run, stores: list[checkpoints.CheckpointStore], seeds: list[int]
) -> list[TrainState]:
  """One state per seed: all from the newest step every store holds, or all fresh.

  Raises:
    ConfigError: some seeds have checkpoints and others none.
  """
  abstract = run.abstract_state()
  try:
    restored = checkpoints.restore_latest_common(stores, flax.serialization.to_state_dict(abstract))
  except (ValueError, RuntimeError) as e:  # incompatible with the config, or all damaged
    raise ConfigError(str(e)) from None
  if restored is not None:
    step, state_dicts, _ = restored
    logging.info("resumed from the checkpoint at step %d", step)
    return [flax.serialization.from_state_dict(abstract, d) for d in state_dicts]
  if run.pretrained is not None:  # published weights, not a draw: passed in, never compiled in
    return [run.init_state(None) for _ in seeds]
  init = jax.jit(
    run.init_state,
    out_shardings=parallel.replicated(run.mesh),
  )
  return [init(rng.stream_key(seed, rng.INIT)) for seed in seeds]
