"""Published weights on the command line (`config.pretrained`): --mode=sample from a diffusers
folder or a Stable Diffusion single file without a run (a fine-tuning run's latest checkpoint
replaces the published U-Net), and --mode=export, the diffusers folder of a fine-tuned run."""

import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from diffusion_jax import pretrained
from diffusion_jax.experiment import generate
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import samplers


def load_pipeline(config: ml_collections.ConfigDict):
  """The DDPM or StableDiffusion of `config.pretrained`.

  Raises:
    ConfigError: no pretrained path, or weights that do not load (the one-line WeightsError).
  """
  if not config.get("pretrained"):
    raise ConfigError("config.pretrained is not set: --config.pretrained=DIR (or FILE.safetensors)")
  options = {"dtype": config.model.dtype}
  if config.pretrained_components:
    options["components"] = config.pretrained_components
  try:
    return pretrained.load_pretrained(config.pretrained, **options)
  except pretrained.WeightsError as e:
    raise ConfigError(f"config.pretrained: {e}") from None


def _prompts(config) -> list[str]:
  sample = config.sample
  if sample.prompt is not None:
    return [sample.prompt]
  if sample.prompts_file:
    try:
      with open(sample.prompts_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"sample.prompts_file={sample.prompts_file!r}: {e}") from None
    if lines:
      return lines
    raise ConfigError(f"sample.prompts_file={sample.prompts_file!r} holds no prompt")
  raise ConfigError(
    'Stable Diffusion needs a prompt: --config.sample.prompt="..." (or prompts_file)'
  )


def _picture(path: str, field: str, mode: str, size=None) -> np.ndarray:
  try:
    with Image.open(path) as image:
      image = image.convert(mode)
      if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
      return np.asarray(image)
  except (OSError, ValueError) as e:
    raise ConfigError(f"sample.{field}={path!r} is not a readable picture ({e})") from None


def sample(config: ml_collections.ConfigDict, workdir: str, unet_params=None, step=None):
  """Images of the published model (with `unet_params`, a fine-tuned U-Net at `step`).

  Returns:
    (png path, npz path, uint8 samples [N, H, W, C]).
  """
  pipe = load_pipeline(config)
  s = config.sample
  if unet_params is not None:
    pipe.params = {**pipe.params, "unet": unet_params}
  name = f"samples_{step:07d}_seed{s.seed}" if step is not None else f"pretrained_seed{s.seed}"
  if isinstance(pipe, pretrained.DDPM):
    if s.prompt or s.prompts_file or s.init_image or s.mask:
      raise ConfigError("a DDPM checkpoint takes no prompt, init_image or mask")
    out = []
    for start in tqdm(range(0, s.num_samples, s.batch_size), desc="sampling", unit="batch"):
      count = min(s.batch_size, s.num_samples - start)
      out.append(_draw(pipe.sample, count, s, first_index=start))
    samples = np.concatenate(out)
    return (*generate.write_samples(workdir, name, samples), samples)
  prompts = _prompts(config)
  options = _image_options(s)
  name += f"_w{float(s.guidance_scale):g}"
  latent_size = lambda pixels: pixels // pipe.vae_factor
  out = []
  for prompt in prompts:
    for start in tqdm(range(0, s.num_samples, s.batch_size), desc=prompt[:40], unit="batch"):
      count = min(s.batch_size, s.num_samples - start)
      image_options = {k: _repeat(v, count) for k, v in options.items()}
      height = image_options["init_image"].shape[1] if "init_image" in image_options else None
      height = height or s.height or (pipe.info.get("sample_size") or 64) * pipe.vae_factor
      width = image_options["init_image"].shape[2] if "init_image" in image_options else None
      width = width or s.width or height
      shape = (count, latent_size(height), latent_size(width), pipe.latent_channels)
      noise, _ = samplers.initial_noise(jax.random.key(s.seed), shape, start)
      negative = [s.negative_prompt or ""] * count
      out.append(
        _draw(
          pipe.sample,
          [prompt] * count,
          s,
          negative_prompts=negative,
          guidance_scale=float(s.guidance_scale),
          init_latents=noise,
          height=height,
          width=width,
          **image_options,
        )
      )
  samples = np.concatenate(out)
  extra = {"guidance_scale": np.float32(s.guidance_scale)}
  return (*generate.write_samples(workdir, name, samples, prompts=prompts, **extra), samples)


def _draw(fn, what, s, **options):
  try:
    return fn(what, sampler=s.sampler, num_steps=s.num_steps, seed=s.seed, **options)
  except ValueError as e:  # sizes, strength, steps: one line naming the setting
    raise ConfigError(f"sample: {e}") from None


def _image_options(s) -> dict:
  options = {}
  if s.init_image:
    size = (s.width, s.height) if s.height and s.width else None
    options["init_image"] = _picture(s.init_image, "init_image", "RGB", size)
    if s.strength is not None:
      options["strength"] = float(s.strength)
  if s.mask:
    if not s.init_image:
      raise ConfigError("sample.mask needs sample.init_image (the picture to paint into)")
    image = options["init_image"]
    options["mask"] = _picture(s.mask, "mask", "L", image.shape[1::-1]) / np.float32(255)
  return options


def _repeat(value, count: int):
  """One picture (or mask) for each of `count` images; other options as they are."""
  return np.repeat(value[None], count, axis=0) if isinstance(value, np.ndarray) else value


def export(config: ml_collections.ConfigDict, workdir: str, unet_params, step: int) -> str:
  """Writes WORKDIR/export/diffusers_<step>: the published pipeline with the fine-tuned U-Net, a
  diffusers folder that `StableDiffusionPipeline.from_pretrained` and `load_pretrained` read.

  Returns:
    The folder.
  """
  pipe = load_pipeline(config)
  if not isinstance(pipe, pretrained.StableDiffusion):
    raise ConfigError("--mode=export writes Stable Diffusion runs (config.pretrained)")
  folder = os.path.join(workdir, "export", f"diffusers_{step:07d}")
  partial = folder + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  source = config.pretrained if os.path.isdir(config.pretrained) else None
  components = source or config.pretrained_components
  for part in ("tokenizer", "scheduler"):
    shutil.copytree(os.path.join(components, part), os.path.join(partial, part))
  if source:
    for part in ("vae", "text_encoder"):
      shutil.copytree(os.path.join(source, part), os.path.join(partial, part))
    shutil.copy(os.path.join(source, "model_index.json"), partial)
  else:
    pretrained.save_vae(
      os.path.join(partial, "vae"), pipe.vae_model.config, pipe.params["vae"], pipe.scaling_factor
    )
    pretrained.save_text_encoder(
      os.path.join(partial, "text_encoder"), pipe.text_model.config, pipe.params["text"]
    )
    shutil.copy(os.path.join(components, "model_index.json"), partial)
  pretrained.save_unet(
    os.path.join(partial, "unet"),
    pipe.unet_model.config,
    jax.device_get(unet_params),
    pipe.info["linear_projection"],
    pipe.info.get("sample_size"),
  )
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(partial, folder)
  logging.info("exported the U-Net of step %d with the published parts to %s", step, folder)
  return folder
