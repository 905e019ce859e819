"""Text-to-image latent diffusion on the shapes set: both stages of Stable Diffusion's recipe.

Run (one command trains the autoencoder into WORKDIR/autoencoder, then the latent model):
  python main.py --config=shapes_latent_text
  python main.py --config=shapes_latent_text --mode=sample \\
    --config.sample.prompt="a blue triangle" --config.sample.guidance_scale=3

Stage 1 is `shapes_autoencoder` (64x64 images to 8x8x4 latents). Stage 2 is `shapes_text`'s
text-conditional U-Net, cross-attention included, on those latents: it sees x0 = scale * z, z drawn
from each training image's posterior, with the scale estimated once from the data (1 / the std of
the latents). Samples are decoded to 64x64 pixels.

The second stage encodes the training set once (latent.cache) and draws each step's latents from
those posteriors. Expected (benchmarks/results/latent_diffusion.md): the first stage about 9.5
minutes and the second about 13 on 2 cores; at guidance 3 the judge finds the prompted colour in
100% of the samples and the prompted shape in 94% (93% for the held-out pairs).
"""

from configs import shapes_autoencoder, shapes_text


def get_config():
  config = shapes_text.get_config()
  config.data.image_size = 64
  config.latent.autoencoder_config = "shapes_autoencoder"
  # The autoencoder section is the first stage's (the run copies it from there when it starts).
  config.autoencoder = shapes_autoencoder.get_config().autoencoder
  config.model.out_channels = config.autoencoder.z_channels
  # The 20,000 training images encoded once (about a minute): steps twice as fast.
  config.latent.cache = True
  config.model.channel_mult = (1, 2)
  config.model.cross_attn_resolutions = (8, 4)
  config.train.num_steps = 6000
  config.train.sample_every = 3000
  config.train.num_grid_samples = 64
  return config
