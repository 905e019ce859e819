"""Score distillation (DreamFusion) with the shapes_text model as the frozen prior.

Run, after training the prior (python main.py --config=shapes_text):
  python main.py --config=shapes_sds --mode=sds --config.sds.prompt="a red circle"
  python main.py --config=shapes_sds --mode=sds --config.sds.mode=2d --workdir=runs/sds_2d

A 32³ voxel grid of density and albedo, started as a fuzzy ball at the centre, is rendered at
16x16 (the prior's resolution) from 4 random cameras per step around the object (elevation
-10..30 degrees, distance 3-3.5, field of view 40 degrees) on the shapes set's dark background;
the prior's guided noise prediction for the prompt (guidance 7.5) pulls the renders towards
images of the prompt, from every side at once. sds.mode=2d optimises a single 16x16 image
instead. Outputs: WORKDIR/sds/views.{npz,png,gif} (a ring of 16 views), loss.png, checkpoints.

Any conditional run can be the prior, a latent one too (--config.sds.prior_workdir=
runs/shapes_latent_text: the renders are encoded, 64x64 to 8x8x4), and Stable Diffusion from disk
(--config.pretrained=DIR; README, "Score distillation").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.sds.prior_workdir = "runs/shapes_text"
  config.sds.prompt = "a red circle"
  return config
