"""Stable Diffusion inpainting (`StableDiffusion.sample` with `init_image` and `mask`) gives the
latents of diffusers' StableDiffusionInpaintPipeline.

The fixture (tests/fixtures/sd_pipelines, written by its make_fixture.py) holds diffusers' final
latents for the tiny `sd1` pipeline (a 4-channel U-Net: the known region is blended back in at
every step) and `sd1_inpaint` (a 9-channel inpainting U-Net: mask and masked-image latents are its
inputs), from fixed noise and a rectangle mask. diffusers encodes images with a draw from the VAE's
posterior, the project with its mean; the references were made with diffusers' draw replaced by
the mean, for the image's and for the masked image's latents.
"""

import dataclasses
import pathlib

import numpy as np
import pytest

from diffusion_jax.pretrained import scheduler
from diffusion_jax.pretrained.stable_diffusion import _blend_timesteps, load_stable_diffusion

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_pipelines"
PROMPTS = ["a red circle", "A photo of a CAT, on a mat!"]
RUN = dict(negative_prompts=["blurry", ""], num_steps=10, guidance_scale=7.5, return_latents=True)

# XLA's cheapest pipeline and the shared compilation cache: each sample() setting compiles the
# whole sampling loop.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _rel(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(FIXTURE / "sd1_reference.npz"))


@pytest.fixture(scope="module")
def pipes():
  return {name: load_stable_diffusion(str(FIXTURE / name)) for name in ("sd1", "sd1_inpaint")}


def _inpaint(pipe, ref, **options):
  inputs = dict(init_image=ref["images"], mask=ref["inpaint_mask"])
  return pipe.sample(PROMPTS, **inputs, init_latents=ref["inpaint_noise"], **RUN, **options)


# Strength 1.0 (a start from pure noise, 1.8e-6 by hand) differs from 0.6 only in that start,
# which the 9-channel test below runs; one compile fewer.
@pytest.mark.parametrize("strength", [0.6])
def test_blending_in_latent_space_matches_diffusers(pipes, reference, strength):
  pipe = pipes["sd1"]
  latents = _inpaint(pipe, reference, strength=strength)
  key = "inpaint_latents" if strength == 1.0 else "inpaint_partial_latents"
  # Measured: 1.8e-6 (strength 1.0), 2.1e-6 (0.6).
  assert _rel(latents, reference[key]) < 1e-3
  # After the last step the kept region is the image's latents (the 16x16 mask's even pixels).
  keep = reference["inpaint_mask"][:, ::2, ::2] < 0.5
  image_latents = pipe.scaling_factor * reference["mean"]
  np.testing.assert_allclose(latents[keep], image_latents[keep], rtol=0, atol=1e-5)


def test_inpainting_unet_matches_diffusers(pipes, reference):
  assert pipes["sd1_inpaint"].unet_model.config.in_channels == 9
  latents = _inpaint(pipes["sd1_inpaint"], reference)  # strength 1.0: from pure noise
  # Measured: 1.5e-6.
  assert _rel(latents, reference["inpaint_unet_latents"]) < 1e-3


def test_inpainting_inputs_are_checked(pipes, reference):
  mask, images = reference["inpaint_mask"], reference["images"]
  with pytest.raises(ValueError, match="mask needs init_image"):
    pipes["sd1"].sample(PROMPTS, mask=mask)
  with pytest.raises(ValueError, match="inpainting U-Net .* pass init_image and mask"):
    pipes["sd1_inpaint"].sample(PROMPTS, init_image=images)
  with pytest.raises(ValueError, match=r"mask has shape \(2, 8, 8\)"):
    pipes["sd1"].sample(PROMPTS, init_image=images, mask=mask[:, ::2, ::2])


@pytest.mark.parametrize(("spacing", "steps"), [("leading", 10), ("linspace", 10), ("trailing", 7)])
def test_the_known_region_is_noised_to_the_next_grid_timestep(spacing, steps):
  config = scheduler.load_scheduler(str(FIXTURE / "sd1"))
  config = dataclasses.replace(config, timestep_spacing=spacing)
  grid = scheduler.inference_timesteps(config, steps)
  step = config.num_train_timesteps // steps
  step_next, known_t = _blend_timesteps(grid, step)
  # diffusers: timesteps[i + 1], the image's latents themselves after the last step; the DDIM
  # step itself goes to t - T // S, which is not the next grid timestep for linspace and
  # trailing here.
  np.testing.assert_array_equal(known_t, [*grid[1:], -1])
  np.testing.assert_array_equal(step_next, np.maximum(grid - step, -1))
  assert (step_next[:-1] == known_t[:-1]).all() == (spacing == "leading")
