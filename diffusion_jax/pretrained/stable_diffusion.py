"""Stable Diffusion from published weights: prompt encoding, the U-Net, the VAE and sampling
(text-to-image, image-to-image, inpainting) with the numbers of diffusers' pipelines.

`load_stable_diffusion` reads a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`) or an original single file (the U-Net, VAE and text
encoder of one `.safetensors`; the tokenizer and scheduler then come from a folder of them, as
single files hold neither).

Latents here are the diffusion model's: the VAE's posterior mean times the scaling factor (0.18215
for Stable Diffusion 1.x and 2.x), NHWC. Images are NHWC in [-1, 1], or uint8 from `sample`.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.autoencoder import Autoencoder
from diffusion_jax.models.latent_unet import LatentUNet
from diffusion_jax.pretrained import clip, scheduler, unet, vae
from diffusion_jax.pretrained.files import WeightsError
from diffusion_jax.sampling import samplers
from diffusion_jax.sampling.ddim_grid import ddim_grid_sample, img2img_timesteps
from diffusion_jax.sampling.guidance import combine
from diffusion_jax.text.clip_bpe import ClipTokenizer, load_clip_tokenizer


@dataclasses.dataclass
class StableDiffusion:
  """A loaded Stable Diffusion: its modules, float32 (or `dtype`) parameters on the device,
  tokenizer and scheduler. Build it with `load_stable_diffusion`."""

  unet_model: unet.LatentUNet
  vae_model: Autoencoder
  text_model: clip.ClipTextModel
  tokenizer: ClipTokenizer
  scheduler: scheduler.SchedulerConfig
  params: dict  # {"unet": ..., "vae": ..., "text": ...}
  scaling_factor: float
  info: dict  # the U-Net's {"linear_projection", "sample_size"}

  @property
  def latent_channels(self) -> int:
    return self.vae_model.config.z_channels

  @property
  def vae_factor(self) -> int:
    return 2 ** (len(self.vae_model.config.channel_mult) - 1)

  @functools.cached_property
  def schedule(self):
    return scheduler.schedule(self.scheduler)

  @functools.cached_property
  def _jitted(self) -> dict:
    text, net, ae = self.text_model, self.unet_model, self.vae_model
    return {
      "text": jax.jit(lambda p, ids: text.apply({"params": p}, ids)),
      "unet": jax.jit(lambda p, x, t, c: net.apply({"params": p}, x, t, c)),
      "encode": jax.jit(lambda p, x: ae.apply({"params": p}, x, method=Autoencoder.encode).mean),
      "decode": jax.jit(lambda p, z: ae.apply({"params": p}, z, method=Autoencoder.decode)),
    }

  def encode_prompt(self, prompts: list[str]) -> jax.Array:
    """[B, 77, D] float32 text embeddings (the text encoder's last layer after its final norm)."""
    return self._jitted["text"](self.params["text"], jnp.asarray(self.tokenizer(prompts)))

  def unet(self, latents, t, context) -> jax.Array:
    """The U-Net's output (ε or v, as `scheduler.prediction` says): [B, h, w, C] float32."""
    t = jnp.broadcast_to(jnp.asarray(t), (latents.shape[0],))
    return self._jitted["unet"](self.params["unet"], latents, t, context)

  def vae_encode(self, images) -> jax.Array:
    """Latents (scaled posterior means) of images [B, H, W, 3] in [-1, 1]."""
    return self.scaling_factor * self._jitted["encode"](self.params["vae"], images)

  def vae_decode(self, latents) -> jax.Array:
    """Images [B, H, W, 3] (about [-1, 1]) of latents."""
    return self._jitted["decode"](self.params["vae"], jnp.asarray(latents) / self.scaling_factor)

  def denoiser(self, unet_params, context, guidance_scale: float):
    """denoise_fn(x, t) of the U-Net with `sample`'s classifier-free guidance, context =
    [cond; uncond] ([2B, 77, D]): traceable, for callers that jit it themselves (as
    score distillation does, parameters as arguments)."""
    return _denoise_fn(self.unet_model, unet_params, context, guidance_scale)

  def latents_of(self, vae_params, images) -> jax.Array:
    """`vae_encode` with the parameters as an argument: traceable and differentiable."""
    posterior = self.vae_model.apply({"params": vae_params}, images, method=Autoencoder.encode)
    return self.scaling_factor * posterior.mean

  def sample(
    self,
    prompts: list[str],
    *,
    negative_prompts: list[str] | None = None,
    sampler: str = "ddim",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    init_latents=None,
    init_image=None,
    strength: float | None = None,
    mask=None,
    return_latents: bool = False,
  ) -> np.ndarray:
    """Images for prompts, as diffusers' StableDiffusion pipelines make them.

    Args:
      prompts: N prompts.
      negative_prompts: N prompts that guidance steers away from; None: empty prompts.
      sampler: "ddim" (on the scheduler's grid, diffusers' DDIMScheduler step) or one of the
        project's samplers ("ddpm", "dpm_solver++", "heun") on the checkpoint's schedule.
      num_steps: sampling steps.
      guidance_scale: classifier-free guidance weight; up to 1: none (the conditional model
        alone, as diffusers).
      seed: the noise of image i is drawn from fold_in(key(seed), i).
      height, width: image size in pixels (a multiple of 8 x 2 ** (U-Net levels - 1)); default:
        the U-Net's sample_size (or the init image's size).
      init_latents: [N, h, w, C] the Gaussian noise to start from instead of drawing it: x_T for
        text-to-image, the noise added to the image's latents for image-to-image.
      init_image: [N, H, W, 3] uint8 or float in [-1, 1]: image-to-image (and inpainting) input.
      strength: image-to-image's fraction of the steps to run, in (0, 1] (default 0.8; 1.0 for
        inpainting).
      mask: [N, H, W] (or [N, H, W, 1]), 1 where to paint anew, 0 where to keep init_image
        (binarised at 0.5; nearest-neighbour at the latents' size): after every DDIM step the
        kept region is set to the image's latents noised to the next grid timestep (clean
        after the last), or for an inpainting U-Net (9 input channels) the mask and the masked
        image's latents are its extra inputs. Images are encoded with the VAE's posterior mean
        where diffusers draws from the posterior.
      return_latents: return the final latents instead of decoded images.

    Returns:
      [N, H, W, 3] uint8 images (or [N, h, w, C] float32 latents).
    """
    n = len(prompts)
    negative_prompts = [""] * n if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != n:
      raise ValueError(f"{len(negative_prompts)} negative prompts for {n} prompts")
    if mask is not None and init_image is None:
      raise ValueError("mask needs init_image")
    inpaint_unet = self.unet_model.config.in_channels == 2 * self.latent_channels + 1
    if inpaint_unet and (mask is None or init_image is None):
      raise ValueError("this is an inpainting U-Net (9 input channels): pass init_image and mask")
    image = None if init_image is None else _as_float_image(init_image, n)
    mask = None if mask is None else _pixel_mask(mask, image.shape)
    if image is not None:
      height, width = image.shape[1:3]
    size = (self.info.get("sample_size") or 64) * self.vae_factor
    height, width = height or size, width or size
    f = self.vae_factor * 2 ** (len(self.unet_model.config.block_channels) - 1)
    if height % f or width % f:
      raise ValueError(f"height={height} and width={width} must be multiples of {f}")
    shape = (n, height // self.vae_factor, width // self.vae_factor, self.latent_channels)
    if init_latents is None:
      noise, _ = samplers.initial_noise(jax.random.key(seed), shape)
    else:
      noise = jnp.asarray(init_latents, jnp.float32)
      if noise.shape != shape:
        raise ValueError(f"init_latents has shape {noise.shape}, need {shape}")
    context = jnp.concatenate([self.encode_prompt(prompts), self.encode_prompt(negative_prompts)])
    if sampler != "ddim" and (image is not None or init_latents is not None):
      raise ValueError(f"init_image and init_latents need sampler='ddim', not {sampler!r}")
    samplers.check_sampler(sampler, num_steps, self.scheduler.num_train_timesteps)
    if image is not None:
      strength = (1.0 if mask is not None else 0.8) if strength is None else strength
      img2img_timesteps(np.arange(num_steps), strength)  # checks strength
    out = self._generate(
      self.params,
      context,
      noise,
      image,
      mask,
      jax.random.key(seed),
      scale=float(guidance_scale),
      sampler=sampler,
      num_steps=num_steps,
      strength=strength,
    )
    if return_latents:
      return np.asarray(out)
    pictures = self.vae_decode(out)
    return np.asarray(jnp.round(jnp.clip(pictures / 2 + 0.5, 0, 1) * 255)).astype(np.uint8)

  @functools.cached_property
  def _generate(self):
    static = ("scale", "sampler", "num_steps", "strength")
    return jax.jit(functools.partial(_generate, self._static()), static_argnames=static)

  def _static(self) -> dict:
    """The modules and settings `_generate` closes over (its arguments are the arrays)."""
    return {
      "unet": self.unet_model,
      "vae": self.vae_model,
      "scheduler": self.scheduler,
      "schedule": self.schedule,
      "scaling_factor": self.scaling_factor,
    }


def _denoise_fn(net, params, context, scale: float, extra=None):
  """denoise_fn(x, t) of the U-Net with classifier-free guidance on context = [cond; uncond]
  and, for an inpainting U-Net, `extra` channels appended to its input."""
  cond, _ = jnp.split(context, 2)
  apply = lambda x, t, c: net.apply({"params": params}, x, t, c)

  def with_extra(x):
    if extra is None:
      return x
    extra_b = jnp.concatenate([extra] * (x.shape[0] // extra.shape[0]))
    return jnp.concatenate([x, extra_b.astype(x.dtype)], axis=-1)

  def denoise_fn(x, t):
    if scale <= 1.0:  # as diffusers: no guidance up to 1
      return apply(with_extra(x), t, cond)
    both = apply(with_extra(jnp.concatenate([x, x])), jnp.concatenate([t, t]), context)
    out_c, out_u = jnp.split(both, 2)
    return combine(out_c, out_u, scale, x.shape[-1])

  return denoise_fn


def _generate(
  parts, params, context, noise, image, mask, key, *, scale, sampler, num_steps, strength
):
  """The final latents of `StableDiffusion.sample` (traced once per static setting)."""
  net, config, schedule = parts["unet"], parts["scheduler"], parts["schedule"]
  denoise = _denoise_fn(net, params["unet"], context, scale)
  if sampler != "ddim":
    return samplers.sample(
      denoise,
      schedule,
      noise.shape,
      key,
      sampler=sampler,
      num_steps=num_steps,
      prediction=config.prediction,
      clip_x0=False,
    )
  grid = scheduler.inference_timesteps(config, num_steps)
  run = functools.partial(
    ddim_grid_sample,
    schedule=schedule,
    step_size=config.num_train_timesteps // num_steps,
    final_alpha_cumprod=config.final_alpha_cumprod,
    prediction=config.prediction,
    clip_x0=config.clip_sample,
  )
  if image is None:
    return run(denoise, x=noise, timesteps=grid)

  def encode(x):
    posterior = parts["vae"].apply({"params": params["vae"]}, x, method=Autoencoder.encode)
    return parts["scaling_factor"] * posterior.mean

  grid = img2img_timesteps(grid, strength)
  inpaint_unet = mask is not None and net.config.in_channels > noise.shape[-1]
  if inpaint_unet:  # the image's and the masked image's latents (mask 1: cleared), one call
    latents, masked = jnp.split(encode(jnp.concatenate([image, image * (1 - mask)])), 2)
  else:
    latents = encode(image)
  t0 = int(grid[0])
  x = schedule.sqrt_alphas_cumprod[t0] * latents
  x = x + schedule.sqrt_one_minus_alphas_cumprod[t0] * noise
  if mask is None:
    return run(denoise, x=x, timesteps=grid)
  if strength == 1.0:
    x = noise  # full strength starts from pure noise, as diffusers' inpainting does
  small = _latent_mask(mask, latents.shape)
  if inpaint_unet:  # U-Net input [x_t, mask, masked image latents], no blending
    extra = jnp.concatenate([small, masked], axis=-1)
    return run(_denoise_fn(net, params["unet"], context, scale, extra), x=x, timesteps=grid)

  step_next, known_t = (
    jnp.asarray(a, jnp.int32)
    for a in _blend_timesteps(grid, config.num_train_timesteps // num_steps)
  )

  def blend(x_next, t_next):
    t = known_t[jnp.argmax(step_next == t_next)]
    at = jnp.maximum(t, 0)
    known = schedule.sqrt_alphas_cumprod[at] * latents
    known = known + schedule.sqrt_one_minus_alphas_cumprod[at] * noise
    known = jnp.where(t < 0, latents, known)
    return small * x_next + (1 - small) * known

  return run(denoise, x=x, timesteps=grid, blend_fn=blend)


def _blend_timesteps(grid, step_size: int) -> tuple[np.ndarray, np.ndarray]:
  """What inpainting by blending noises the known region to after each DDIM step.

  diffusers noises the image's latents to the grid's next timestep (and leaves them clean after
  the last step), which is not the step's own t' = t - T // S where the grid is not spaced by
  T // S ("linspace", "trailing" spacing). `ddim_grid_sample` gives the blend t'; these tables
  tell the step by it (t' is unique: the grid descends by at least T // S).

  Args:
    grid: [S'] the descending timesteps run.
    step_size: T // S.

  Returns:
    ([S'] each step's t' as the blend receives it (-1 below 0), [S'] the timestep to noise the
    known region to, -1 for clean).
  """
  grid = np.asarray(grid, np.int64)
  step_next = np.maximum(grid - step_size, -1)
  if len(np.unique(step_next)) != len(grid):
    raise ValueError(f"the timestep grid {grid.tolist()} has steps shorter than {step_size}")
  return step_next, np.append(grid[1:], -1)


def _as_float_image(image, n: int) -> jax.Array:
  image = np.asarray(image)
  if image.ndim != 4 or image.shape[0] != n or image.shape[-1] != 3:
    raise ValueError(f"init_image has shape {image.shape}, need [{n}, H, W, 3]")
  if image.dtype == np.uint8:
    return jnp.asarray(image, jnp.float32) / 127.5 - 1.0
  return jnp.asarray(image, jnp.float32)


def _pixel_mask(mask, shape) -> jax.Array:
  """The mask binarised at 0.5 as [N, H, W, 1] float32 (diffusers' mask processor)."""
  given = np.asarray(mask, np.float32)
  mask = given[..., None] if given.ndim == 3 else given
  if mask.shape != (*shape[:3], 1):
    raise ValueError(f"mask has shape {given.shape}, need {shape[:3]} (or with a last axis of 1)")
  return jnp.asarray(mask >= 0.5, jnp.float32)


def _latent_mask(mask: jax.Array, latent_shape) -> jax.Array:
  """A binarised [N, H, W, 1] mask at the latents' size: nearest-neighbour, as torch's
  interpolate."""
  fy = mask.shape[1] // latent_shape[1]
  fx = mask.shape[2] // latent_shape[2]
  return mask[:, ::fy, ::fx]


def for_the_cpu(net: LatentUNet, ae: Autoencoder) -> tuple[LatentUNet, Autoencoder]:
  """The same networks computed the fastest way measured on a CPU: the U-Net's chunked
  attention, Winograd's convolutions at its first level and in the whole VAE
  (benchmarks/results/pretrained_speed.md). Parameters are unchanged."""
  levels = len(net.config.block_channels)
  conv = ("winograd",) + ("xla",) * (levels - 1)
  net = LatentUNet(dataclasses.replace(net.config, attention="chunked", conv=conv))
  return net, Autoencoder(dataclasses.replace(ae.config, conv="winograd"))


def load_stable_diffusion(
  path: str, *, components: str | None = None, dtype: str = "float32", **single_file
) -> StableDiffusion:
  """Stable Diffusion from a diffusers pipeline folder or an original single file.

  Args:
    path: a folder with `model_index.json`, or a `.safetensors` single file.
    components: for a single file, a folder with `tokenizer/` and `scheduler/` (a diffusers
      pipeline folder of the same model family, or those two folders alone).
    dtype: compute dtype of all three networks ("float32" or "bfloat16"); parameters float32.
    **single_file: what a single file's shapes cannot tell: `num_heads` or `head_dim` of the
      U-Net (1.x: 8 heads, the default; 2.x: head_dim=64), `num_groups` of the U-Net and VAE
      (32), `text_heads` of the text encoder (default: width / 64).

  On a CPU the networks compute as `for_the_cpu` says.

  Raises:
    WeightsError: a missing or unreadable part, one line naming it.
  """
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "model_index.json")):
      raise WeightsError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
    net, unet_params, info = unet.load_unet(path, dtype=dtype)
    ae, vae_params, scaling = vae.load_vae(path, dtype=dtype)
    text, text_params = clip.load_text_encoder(path, dtype=dtype)
    folder = path
  else:
    if components is None:
      raise WeightsError(
        f"{path}: a single file holds no tokenizer or scheduler; pass components=FOLDER with "
        "tokenizer/ and scheduler/"
      )
    unknown = sorted(set(single_file) - {"num_heads", "head_dim", "num_groups", "text_heads"})
    if unknown:
      raise TypeError(f"unexpected arguments {unknown}")
    pick = lambda *names: {k: single_file[k] for k in names if k in single_file}
    net, unet_params, info = unet.load_ldm_unet(
      path, dtype=dtype, **pick("num_heads", "head_dim", "num_groups")
    )
    ae, vae_params, scaling = vae.load_ldm_vae(path, dtype=dtype, **pick("num_groups"))
    heads = single_file.get("text_heads")
    text, text_params = clip.load_ldm_text_encoder(path, num_attention_heads=heads, dtype=dtype)
    folder = components
  if jax.default_backend() == "cpu":
    net, ae = for_the_cpu(net, ae)
  tokenizer = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
  params = jax.device_put({"unet": unet_params, "vae": vae_params, "text": text_params})
  return StableDiffusion(
    unet_model=net,
    vae_model=ae,
    text_model=text,
    tokenizer=tokenizer,
    scheduler=scheduler.load_scheduler(folder),
    params=params,
    scaling_factor=scaling,
    info=info,
  )
