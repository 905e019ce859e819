"""Fine-tuning Stable Diffusion 1.x / 2.x on a captioned image folder.

Run (the U-Net trains; the text encoder and the VAE stay frozen; the loss uses the checkpoint's
own noise schedule and prediction type):
  python main.py --config=stable_diffusion_finetune --config.pretrained=DIR \\
    --config.data.path=CAPTIONED_DIR --workdir=runs/my_sd
  python main.py --workdir=runs/my_sd --mode=sample --config.sample.prompt="..."
  python main.py --workdir=runs/my_sd --mode=export   # a diffusers folder of the fine-tuned model

The folder captions its images with a metadata.jsonl ({"file_name": ..., "text": ...} per line)
or a .txt file beside each image. Re-running resumes from the latest checkpoint; the run is a
pure function of its config and seed like any other.
"""

from configs import stable_diffusion


def get_config():
  config = stable_diffusion.get_config()
  data = config.data
  data.dataset = "folder"
  data.image_size = 512
  data.random_flip = False  # captions may say "left" and "right"
  train = config.train
  train.batch_size = 1
  train.num_steps = 1000
  train.learning_rate = 1e-5
  train.warmup_steps = 0
  train.ema_decay = 0.999
  train.log_every = 10
  train.checkpoint_every = 250
  train.sample_every = 0
  train.num_grid_samples = 0  # draw with --mode=sample from the latest checkpoint
  train.cond_drop_prob = 0.1  # keeps the unconditional model that guidance needs
  return config
