"""Latent against pixel-space diffusion at 64x64: the train step and the sampling cost per image.

The latent model is `shapes_latent_text` (its U-Net on the 8x8x4 latents of a trained
`shapes_autoencoder`); the pixel model is the same U-Net (same width, levels and text encoder,
cross-attention at the same levels: 64 and 32 instead of 8 and 4) on 64x64x3 images. Timed side by
side, alternating the models within each repeat:
  - train step, latent: encoding the batch on the fly (encoder + posterior draw) and the step;
  - train step, latent with latent.cache: the posterior draw from cached moments and the step;
  - train step, pixel: the step;
  - sampling (DDIM, --steps steps, guidance 3): latents then decoding, against pixels.

Run:
  python benchmarks/latent_speed.py --autoencoder=runs/shapes_latent_text/autoencoder
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import median_range, num  # noqa: E402
from configs import shapes_latent_text  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment.run import make_run  # noqa: E402
from diffusion_jax.experiment.train_step import compile_train_step  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402


def configs(autoencoder: str):
  latent = shapes_latent_text.get_config()
  latent.latent.autoencoder_workdir = autoencoder
  latent.latent.autoencoder_config = ""
  latent.latent.scale_factor = 0.37  # any: the cost does not depend on it
  pixel = shapes_latent_text.get_config()
  pixel.latent.autoencoder_config = ""
  pixel.model.out_channels = 3
  pixel.model.cross_attn_resolutions = (64, 32)
  return latent, pixel


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--autoencoder", required=True, help="a trained shapes_autoencoder run")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sample_batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="DDIM steps when sampling")
  args = parser.parse_args()

  latent_config, pixel_config = configs(args.autoencoder)
  for config in (latent_config, pixel_config):
    config.sample.batch_size = args.sample_batch
  latent_run, pixel_run = make_run(latent_config), make_run(pixel_config)
  batch_size = latent_run.train.batch_size
  tokens = latent_run.prompt_condition(["a blue triangle"] * batch_size)["tokens"]
  images = np.random.default_rng(0).integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8)
  put = lambda fields, run: parallel.put_batch(fields, run.mesh)
  pixel_batch = put({"image": images, "tokens": tokens}, pixel_run)
  device_images = put({"image": images}, latent_run)["image"]
  mean, std = latent_run.latent.moments(device_images)
  text = put({"tokens": tokens}, latent_run)["tokens"]
  key = jax.random.key(0)

  states, steps = {}, {}
  for name, run in (("latent", latent_run), ("pixel", pixel_run)):
    states[name] = jax.jit(run.init_state)(rng.stream_key(0, rng.INIT))
    steps[name] = compile_train_step(run)

  def latent_step(cached: bool):
    def call():
      if cached:
        z = latent_run.latent.draw(mean, std, key)
      else:
        z = latent_run.latent.encode(device_images, key)
      states["latent"], metrics = steps["latent"](
        states["latent"], {"latent": z, "tokens": text}, key
      )
      metrics["loss"].block_until_ready()

    return call

  def pixel_step():
    states["pixel"], metrics = steps["pixel"](states["pixel"], pixel_batch, key)
    metrics["loss"].block_until_ready()

  n = args.sample_batch
  cond = {"tokens": latent_run.prompt_condition(["a blue triangle"] * n)["tokens"]}
  options = dict(sampler="ddim", num_steps=args.steps, guidance_scale=3.0)
  samplers = {"latent": latent_run.sample_fn(**options), "pixel": pixel_run.sample_fn(**options)}

  def sample(name):  # the current parameters: the train steps donate the old ones
    return lambda: np.asarray(samplers[name](states[name].ema_params, key, 0, cond))

  calls = {
    "train step, latent (encoder on the fly)": latent_step(False),
    "train step, latent (latent.cache)": latent_step(True),
    "train step, pixel": pixel_step,
    f"sample {n} images, latent (decode included)": sample("latent"),
    f"sample {n} images, pixel": sample("pixel"),
  }
  start = time.perf_counter()
  for call in calls.values():  # compile and warm up
    call()
  print(f"compiled and warmed up in {time.perf_counter() - start:.0f} s", flush=True)
  times = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, call in calls.items():
      t = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - t)

  count = lambda run: sum(x.size for x in jax.tree.leaves(states[run].params))
  print(
    f"\nU-Nets: latent {count('latent'):,} parameters on 8x8x4, pixel {count('pixel'):,} on "
    f"64x64x3; batch {batch_size}; {jax.device_count()} {jax.default_backend()} device(s); "
    f"{args.repeats} repeats, alternating\n"
  )
  print("| what | seconds, median (min–max) | pixel / latent |")
  print("|---|---|---|")
  pixel_train = statistics.median(times["train step, pixel"])
  pixel_sample = statistics.median(times[f"sample {n} images, pixel"])
  for name, values in times.items():
    reference = pixel_sample if name.startswith("sample") else pixel_train
    ratio = reference / statistics.median(values)
    print(f"| {name} | {median_range(values)} | {num(ratio)} |")
  per_image = {k: statistics.median(v) / n for k, v in times.items() if k.startswith("sample")}
  print("\nper image: " + ", ".join(f"{k.split(', ')[1]} {num(v)} s" for k, v in per_image.items()))


if __name__ == "__main__":
  jnp.zeros(())  # start the backend before timing anything
  main()
