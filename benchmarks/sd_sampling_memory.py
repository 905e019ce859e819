"""Peak host memory of Stable Diffusion 1.5 sampling at 512x512 in float32 on the CPU.

  python benchmarks/sd_sampling_memory.py [--steps=2] [--dtype=float32]

Builds a `pretrained.StableDiffusion` of Stable Diffusion 1.5's sizes (U-Net 859.5M parameters,
VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M) with random weights (no download), the tokenizer of
tests/fixtures/clip_tokenizer/sd1 and the PNDM scheduler config of
tests/fixtures/diffusers_scheduler/sd15_pndm, then draws one 512x512 image with classifier-free
guidance (a U-Net batch of 2) and prints the time and the process's peak resident memory
(VmHWM), parameters included. On a CPU the networks compute as `load_stable_diffusion` sets
them there (`for_the_cpu`).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.models import (  # noqa: E402
  Autoencoder,
  AutoencoderConfig,
  ClipTextConfig,
  ClipTextModel,
  LatentUNet,
  LatentUNetConfig,
)
from diffusion_jax.pretrained import StableDiffusion, load_scheduler  # noqa: E402
from diffusion_jax.pretrained.stable_diffusion import for_the_cpu  # noqa: E402
from diffusion_jax.text.clip_bpe import load_clip_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_params(module, *args) -> dict:
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(0)
  flat = {
    path: (rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(np.float32)
    for path, leaf in flatten_dict(shapes).items()
  }
  return unflatten_dict(flat)


def _peak_gib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  unet = LatentUNet(LatentUNetConfig(dtype=args.dtype))
  vae = Autoencoder(AutoencoderConfig(dtype=args.dtype))  # the defaults are Stable Diffusion's
  text = ClipTextModel(ClipTextConfig(dtype=args.dtype))
  params = {
    "unet": _random_params(
      unet, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768))
    ),
    "vae": _random_params(vae, jnp.zeros((1, 64, 64, 3))),
    "text": _random_params(text, jnp.zeros((1, 77), jnp.int32)),
  }
  counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}
  params = jax.device_put(params)  # the NumPy copies go, as the loader's do
  if jax.default_backend() == "cpu":
    unet, vae = for_the_cpu(unet, vae)  # as `load_stable_diffusion` on a CPU
  pipe = StableDiffusion(
    unet_model=unet,
    vae_model=vae,
    text_model=text,
    tokenizer=load_clip_tokenizer(f"{ROOT}/tests/fixtures/clip_tokenizer/sd1"),
    scheduler=load_scheduler(f"{ROOT}/tests/fixtures/diffusers_scheduler/sd15_pndm"),
    params=params,
    scaling_factor=0.18215,
    info={"linear_projection": False, "sample_size": 64},
  )
  print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
  start = time.perf_counter()
  images = pipe.sample(["a photo of a lighthouse"], num_steps=args.steps, guidance_scale=7.5)
  elapsed = time.perf_counter() - start
  assert images.shape == (1, 512, 512, 3)
  print(
    f"{args.dtype}, 512x512, {args.steps} DDIM steps with guidance: {elapsed:.1f} s including "
    f"compilation; peak resident memory {_peak_gib():.2f} GiB"
  )


if __name__ == "__main__":
  main()
