"""Stable Diffusion 1.x / 2.x from published weights: text-to-image, image-to-image, inpainting.

Run (nothing trains; the folder is a diffusers pipeline such as stable-diffusion-v1-5, or a
single .safetensors file with --config.pretrained_components=FOLDER for its tokenizer/ and
scheduler/):
  python main.py --config=stable_diffusion --config.pretrained=DIR --mode=sample \\
    --config.sample.prompt="a watercolor of a lighthouse" \\
    --config.sample.negative_prompt="blurry" --config.sample.guidance_scale=7.5
  ... --config.sample.init_image=photo.png --config.sample.strength=0.6   # image-to-image
  ... --config.sample.init_image=photo.png --config.sample.mask=mask.png  # inpainting

The sampler is DDIM on the checkpoint's own timestep grid (diffusers' DDIMScheduler), with the
checkpoint's schedule and prediction type; dpm_solver++, heun and ddpm also work for text-to-image.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "stable_diffusion"  # the U-Net of config.pretrained
  config.model.dtype = "float32"  # "bfloat16" on GPUs and TPUs
  sample = config.sample
  sample.sampler = "ddim"
  sample.num_steps = 50
  sample.guidance_scale = 7.5
  sample.num_samples = 1  # images per prompt
  sample.batch_size = 1
  return config
