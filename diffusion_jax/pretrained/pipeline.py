"""`load_pretrained`: a published diffusion model from disk, whichever kind it is.

A diffusers pipeline folder says what it holds in `model_index.json` (`_class_name`); an original
Stable Diffusion single file (`.safetensors`) is Stable Diffusion.
"""

import os

from diffusion_jax.pretrained.ddpm import DDPM, load_ddpm
from diffusion_jax.pretrained.files import WeightsError, read_config
from diffusion_jax.pretrained.stable_diffusion import StableDiffusion, load_stable_diffusion

# model_index.json's _class_name -> the loader.
PIPELINES = {
  "DDPMPipeline": load_ddpm,
  "DDIMPipeline": load_ddpm,
  "StableDiffusionPipeline": load_stable_diffusion,
  "StableDiffusionImg2ImgPipeline": load_stable_diffusion,
  "StableDiffusionInpaintPipeline": load_stable_diffusion,
}


def load_pretrained(path: str, **options) -> DDPM | StableDiffusion:
  """The published model at `path`.

  Args:
    path: a diffusers pipeline folder (DDPM or Stable Diffusion 1.x / 2.x, PIPELINES), or an
      original Stable Diffusion single file (`.safetensors`; then pass `components=FOLDER` with
      its tokenizer/ and scheduler/).
    **options: passed to the loader: `dtype` for both; `components`, `num_heads`, `head_dim`,
      `num_groups`, `text_heads` for a single file.

  Returns:
    A `DDPM` (`unet(x, t)`, `sample(num_images, ...)`) or a `StableDiffusion` (`encode_prompt`,
    `unet`, `vae_encode`, `vae_decode`, `sample(prompts, ...)`).

  Raises:
    WeightsError: a path that is neither, or a part that does not fit; one line naming it.
  """
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise WeightsError(
        f"{path}: not a .safetensors file or a diffusers pipeline folder (model_index.json)"
      )
    return load_stable_diffusion(path, **options)
  index = os.path.join(path, "model_index.json")
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: no such file or folder")
  if not os.path.isfile(index):
    raise WeightsError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
  name = read_config(index).get("_class_name")
  if name not in PIPELINES:
    raise WeightsError(
      f"{index}: _class_name={name!r} is not supported; supported: {', '.join(PIPELINES)}"
    )
  return PIPELINES[name](path, **options)
