"""Every configuration field, with its default and meaning.

Other configs start from `get_config()` here and override a few fields. Any field can be
changed from the command line: `python main.py --config=shapes --config.train.num_steps=100`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Root of every random stream: init, train, sample, data.
  # A training seed study: "0,1,2,3" trains one model per seed in one program (vmapped over a
  # stacked seed axis), seed s in WORKDIR/seed_<s>, and writes WORKDIR/seed_summary.{json,md}.
  # Empty: one run of `seed` in WORKDIR.
  config.seeds = ""
  # On a CPU under Linux (glibc), keep freed host memory for reuse instead of returning it to the
  # kernel: XLA:CPU allocates each step's temporary buffers afresh, and faulting their pages in
  # again took a fifth of a CIFAR-10 train step on 2 cores. The process keeps its peak memory.
  # No effect on GPU or TPU runs (diffusion_jax/runtime/hostmem.py).
  config.reuse_host_memory = True
  # Published weights (diffusion_jax.pretrained): a diffusers pipeline folder (DDPM, or Stable
  # Diffusion 1.x / 2.x) or a Stable Diffusion single file (.safetensors). --mode=sample then
  # draws from it without a run (configs/stable_diffusion.py, configs/ddpm_pretrained.py), and a
  # fine-tuning run starts from it (configs/stable_diffusion_finetune.py).
  config.pretrained = ""
  # A single file's tokenizer/ and scheduler/: a diffusers pipeline folder of the same family.
  config.pretrained_components = ""

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"  # A tfds image data set name, "folder" or "shapes".
  data.path = ""  # dataset="folder": the image directory (class sub-folders give labels).
  data.image_size = 32  # Images are resized (shorter side) and centre-cropped to this.
  data.split = "train"  # tfds split (also "test", "train[:90%]", ...).
  data.data_dir = ""  # tfds data_dir; empty: tfds' default (~/tensorflow_datasets).
  data.manual_dir = ""  # tfds manual_dir holding the official archive, for offline preparation.
  data.random_flip = True  # Random horizontal flips (deterministic per example and epoch).
  data.num_examples = 20_000  # dataset="shapes": how many images the generated set has.
  # dataset="shapes": classes left out of the training split, e.g. "green triangle,blue square"
  # (to see whether a text-conditional model composes a colour and a shape it never saw together).
  data.exclude_classes = ""
  data.read_threads = 2  # Host threads that decode and batch; the order never depends on it.
  data.prefetch = 2  # Batches prepared ahead of the training step.

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"  # "unet", or "autoencoder" (the network of the `autoencoder` section).
  model.channels = 128  # Base width; level i has channels * channel_mult[i].
  model.channel_mult = (1, 2, 2, 2)  # One entry per resolution level.
  model.num_res_blocks = 2  # ResBlocks per level (the up path has one more).
  model.attn_resolutions = (16,)  # Feature-map sizes that get self-attention.
  model.num_heads = 1
  model.dropout = 0.1
  model.num_groups = 32  # GroupNorm groups.
  model.resamp_with_conv = True  # Convolutions in the down/up-sampling layers.
  # Channels predicted: as many as the image, twice that for diffusion.variance="learned_range"
  # (the prediction, then the variance value v): diffusion.output_channels(3, variance).
  model.out_channels = 3
  model.dtype = "float32"  # Compute dtype; parameters stay float32.
  # The Upsample convolutions computed at the low resolution (4/9 of their FLOPs, the same
  # function and parameters up to float rounding); False upsamples first, as the original.
  model.subpixel_upsample = True
  # "plain" or "fused" (jax.nn.dot_product_attention; cuDNN's flash attention with
  # model.fast.flash_attention).
  model.attention = "plain"
  # 3x3 convolutions: "xla", "winograd" (Winograd's algorithm for every float32 one),
  # "winograd_large" (only where it pays on a CPU: float32, large enough maps and channels; about
  # 1.3-1.6x faster there) or "auto" (winograd_large on a CPU, xla elsewhere).
  model.conv = "auto"
  # Speed paths inside the blocks (diffusion_jax/models/fast/). Flags are "true", "false" or "auto";
  # a run resolves "auto" once from the backend, logs it and writes the value into config.json.
  # None changes the parameters; the results agree up to float rounding.
  model.fast = fast = ml_collections.ConfigDict()
  fast.group_norm = "fused"  # "fused" (one operation with a hand-written gradient) or "reference".
  fast.recompute_dz = "auto"  # Fused GroupNorm's backward recomputes dz (auto: off the CPU).
  fast.hold_branch_gradient = "auto"  # Barrier on residual branches' gradients (off the CPU).
  fast.skips_in_parts = "auto"  # Up path reads (h, skip) without concatenating (off the CPU).
  fast.flash_attention = "auto"  # attention="fused" asks cuDNN for flash attention (on GPUs).
  # Recompute block activations in the backward pass: less memory for large batches, about one
  # more forward pass of compute.
  model.remat = False
  # Examples per network call on each device when sampling and evaluating: a larger batch runs
  # in consecutive chunks of this size, with a chunk's activations in memory at a time (on a
  # CPU with reuse_host_memory, 16 at a time runs as fast as 64 at once). 0: the whole batch.
  model.microbatch = 0
  model.patch_size = 1  # >1: fold p x p pixel patches into channels first (1/p**2 of the compute).
  # Class-conditional: the data set's class count (a label embedding joins the timestep's, plus a
  # learned "no label" entry). 0: not class-conditional.
  model.num_classes = 0
  # Text-conditional (model.text.vocab_size > 0): feature-map sizes whose blocks attend to the
  # prompt's token embeddings (cross-attention; also in the middle), e.g. (8, 4).
  model.cross_attn_resolutions = ()
  # Super-resolution (SR3, Imagen): > 0 conditions the network on a low-resolution image of this
  # size (a proper divisor of data.image_size), upsampled bilinearly and concatenated to x_t, and
  # on that image's noise-augmentation level (the `sr` section). Training derives the image from
  # each batch by averaging blocks of data.image_size / low_res_size pixels, so any data set
  # works; sampling takes it in the condition (from the data set in grids and --mode=sample).
  # 0: an ordinary model.
  model.low_res_size = 0
  # The text encoder trained with the U-Net (a small Transformer over word tokens). Its
  # vocabulary comes from the data set's captions (diffusion_jax/text/tokenizer.py).
  model.text = text = ml_collections.ConfigDict()
  text.vocab_size = 0  # Token embedding rows, >= the caption vocabulary; 0: no text.
  text.width = 64  # Token embedding width (the context the U-Net attends to).
  text.num_layers = 2
  text.num_heads = 4
  text.max_length = 16  # Tokens per prompt (a start token + words + padding).

  # ---------------------------------------------------------------- autoencoder
  # The KL autoencoder of latent diffusion (LDM, Stable Diffusion's VAE), trained by a run with
  # model.name="autoencoder". The defaults are Stable Diffusion's network: f = 8, 4 latent channels.
  config.autoencoder = autoencoder = ml_collections.ConfigDict()
  autoencoder.channels = 128  # Base width; level i has channels * channel_mult[i].
  # One entry per resolution level; the latents are f = 2 ** (levels - 1) times smaller per side.
  autoencoder.channel_mult = (1, 2, 4, 4)
  autoencoder.num_res_blocks = 2  # ResBlocks per encoder level (the decoder has one more).
  autoencoder.z_channels = 4  # Latent channels.
  autoencoder.attn_resolutions = ()  # Feature-map sizes with self-attention (the middle has one).
  autoencoder.num_groups = 32  # GroupNorm groups.
  # Loss per image: the reconstruction error summed over pixels ("l1" or "l2") plus kl_weight
  # times the KL of the posterior to N(0, I) (LDM's β).
  autoencoder.reconstruction = "l1"
  autoencoder.kl_weight = 1e-6
  # LPIPS (Zhang et al. 2018) added to each pixel's error, times perceptual_weight, when
  # lpips_weights names the local file that benchmarks/convert_lpips.py writes ("": off).
  autoencoder.lpips_weights = ""
  autoencoder.perceptual_weight = 1.0
  # LDM's PatchGAN discriminator (off at 0; LDM uses 0.5): from step disc_start on, the loss gains
  # disc_weight times the adaptive weight times the generator's loss (experiment/adversarial.py).
  autoencoder.disc_weight = 0.0
  autoencoder.disc_start = 50001
  autoencoder.disc_channels = 64
  autoencoder.disc_layers = 3

  # ---------------------------------------------------------------- latent
  # Latent diffusion: the diffusion model works on the latents of a trained autoencoder (its
  # `autoencoder` section is copied from that run) and samples are decoded to pixels. Off while
  # both of the first two fields are empty.
  config.latent = latent = ml_collections.ConfigDict()
  latent.autoencoder_workdir = ""  # A trained autoencoder run (model.name="autoencoder").
  # Or an autoencoder config (a name in configs/ or a path) that the same command trains first
  # into WORKDIR/autoencoder, resuming it like any run.
  latent.autoencoder_config = ""
  # x0 = scale_factor * z. 0: estimated once, 1 / the std of the latents of the first
  # `scale_examples` training images (as LDM), and written into the run's config.json.
  latent.scale_factor = 0.0
  latent.scale_examples = 1024
  # Encode the training set's posteriors once into WORKDIR/latent_cache (F x the data set's
  # latents in float32, F = 2 with data.random_flip) and draw each step's latents from there:
  # the same latents as encoding every batch, without the encoder's cost per step.
  latent.cache = False

  # ---------------------------------------------------------------- diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "linear"  # "linear" or "cosine".
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 1e-4  # linear schedule only.
  diffusion.beta_end = 0.02  # linear schedule only.
  diffusion.cosine_s = 0.008  # cosine schedule only.
  # Reverse-step variance: "fixed_large" (β), "fixed_small" (β̃) or "learned_range" (learned per
  # pixel between the two on a log scale, improved DDPM; needs model.out_channels = 2 * channels).
  diffusion.variance = "fixed_large"
  diffusion.clip_x0 = True  # Clip the predicted x0 to [-1, 1] in each reverse step.
  # How every sampler treats the predicted x0 while clip_x0 is true: "static" (clip to [-1, 1]),
  # "dynamic" (Imagen: s = max(1, the threshold_percentile-th percentile of |x0| over each image),
  # then clip to [-s, s] and divide by s) or "none". clip_x0=False turns thresholding off
  # (threshold must then be "static", the default, or "none").
  diffusion.threshold = "static"
  diffusion.threshold_percentile = 0.995  # p in (0, 1] of "dynamic" (Imagen: 0.995).
  diffusion.prediction = "eps"  # What the network predicts: "eps" (DDPM), "x0" or "v".
  # Training loss: "simple" (the squared error of the prediction), "hybrid" (simple plus
  # vlb_weight times the variational bound, which then trains only the learned variance; needs
  # variance="learned_range") or "vlb" (the variational bound alone).
  diffusion.loss = "simple"
  diffusion.vlb_weight = 0.001  # λ of the hybrid loss (improved DDPM).
  # How training draws t: "uniform", or "importance" (p_t ∝ the RMS of the last 10 losses at t,
  # losses weighted by 1 / (T p_t); improved DDPM uses it with loss="vlb").
  diffusion.t_sampling = "uniform"

  # ---------------------------------------------------------------- train
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128  # Global batch, over all devices and hosts.
  train.num_steps = 800_000
  train.learning_rate = 2e-4
  train.warmup_steps = 5000  # Linear warm-up from 0, then constant.
  # >0: the learning rate falls linearly to 0 over the last `cooldown_steps` of num_steps.
  train.cooldown_steps = 0
  train.adam_b1 = 0.9
  train.adam_b2 = 0.999
  train.adam_eps = 1e-8
  train.grad_clip = 1.0  # Global-norm clipping; 0 disables it.
  train.ema_decay = 0.9999
  train.log_every = 100  # Steps between metrics.jsonl / TensorBoard records.
  train.checkpoint_every = 5000
  train.sample_every = 50_000  # Steps between sample grids (0: only at the end).
  train.num_grid_samples = 64  # Images in each training-time sample grid; 0: no grids.
  # Steps between sample-quality figures (eval.metrics: fid, kid, is, pr) of train.eval_samples
  # samples, drawn as --mode=sample does, to WORKDIR/eval_metrics.jsonl; 0: none.
  train.eval_every = 0
  train.eval_samples = 1000
  # Training-time grids are previews, drawn with a fast sampler (the file names say which);
  # --mode=sample uses the sample section's sampler. "" here: the sample section's.
  train.grid_sampler = "dpm_solver++"
  train.grid_num_steps = 20  # At most diffusion.num_timesteps.
  train.keep_checkpoints = 3  # The newest ones kept.
  train.keep_every = 0  # Also keep every checkpoint at a multiple of this step, for good; 0: none.
  # Up to k train steps per dispatch, in a loop on the device: less host overhead for small
  # models. A call ends where a step logs, saves or samples (the first call's end logs in place
  # of step 1). Results do not depend on how steps fall into calls (resuming included); against
  # k = 1, a program of its own, they agree up to float rounding.
  train.steps_per_call = 1
  train.progress = True  # A progress bar with steps/s and ETA on the terminal.
  # How a seed study (`seeds`) runs its K models in one program: "vmap" batches them over a
  # stacked seed axis (fills an accelerator), "unroll" places K copies of the step in the program
  # (the per-seed cost of a single run on a CPU, where XLA's batched convolutions are about 2.8x
  # slower per seed; compiling takes about K times longer). "auto": "unroll" on CPUs, else "vmap".
  train.seed_batching = "auto"
  # A conditional model (model.num_classes or model.text): the probability that an example's
  # label or caption is replaced by "none", which trains the unconditional model that
  # classifier-free guidance needs.
  train.cond_drop_prob = 0.1

  # ---------------------------------------------------------------- sample
  config.sample = sample = ml_collections.ConfigDict()
  # "ddpm" (ancestral), "ddim", "dpm_solver++" (DPM-Solver++(2M)) or "heun" (EDM's sampler).
  sample.sampler = "ddpm"
  # Steps (model calls; heun: noise levels, 2N - 1 calls). Unset: all num_timesteps for ddpm and
  # ddim, 20 for dpm_solver++, 18 for heun.
  sample.num_steps = ml_collections.config_dict.placeholder(int)
  sample.eta = 0.0  # ddim: noise scale η in [0, 1]; 0 is deterministic, 1 the DDPM posterior.
  # Which timesteps ddpm, ddim and dpm_solver++ visit when num_steps < num_timesteps: "uniform",
  # "quadratic" (denser at low noise) or "logsnr" (uniform in log SNR); "" is each one's default
  # (uniform for ddpm and ddim, logsnr for dpm_solver++). heun has its own noise levels.
  sample.skip = ""
  sample.num_samples = 64  # Images written by --mode=sample.
  # Also write each image as its own PNG (samples/<name>/000000.png, ...), as FID tools read them.
  sample.save_images = False
  sample.batch_size = 64  # Images per compiled sampling call.
  sample.seed = 0  # Images i of a seed are the same for any batch size or device count.
  # --mode=sample seed study: "0,1,2,3" draws num_samples images for each of these sample seeds
  # (disjoint random streams) and writes a summary of their figures. Empty: `sample.seed` only.
  sample.seeds = ""
  # A conditional model: what to draw, num_samples images per prompt. `prompt` is one prompt (a
  # class name for a class-conditional model; "" draws unconditional samples); `prompts_file` a
  # text file with one prompt per line. Neither: one prompt per class of the data set.
  sample.prompt = ml_collections.config_dict.placeholder(str)
  sample.prompts_file = ""
  # Classifier-free guidance weight w: 1 is the plain conditional model, 0 the unconditional one,
  # larger values follow the prompt more closely at some cost in diversity (e.g. 3).
  sample.guidance_scale = 1.0
  # Stable Diffusion (config.pretrained): the prompt guidance steers away from ("" by default),
  # image-to-image from a picture file (init_image, with strength in (0, 1]: the fraction of the
  # steps run; 0.8 by default), inpainting where a mask file (white: paint anew) says, and the
  # image size (default: the model's, or the init image's).
  sample.negative_prompt = ml_collections.config_dict.placeholder(str)
  sample.init_image = ""
  sample.strength = ml_collections.config_dict.placeholder(float)
  sample.mask = ""
  sample.height = ml_collections.config_dict.placeholder(int)
  sample.width = ml_collections.config_dict.placeholder(int)

  # ---------------------------------------------------------------- sr
  # Noise-conditioning augmentation of a super-resolution model (model.low_res_size > 0): the
  # low-resolution input z becomes cos(πs/2) z + sin(πs/2) ε at level s in [0, 1] (0: z itself,
  # 1: pure noise), and s is an input of the network (diffusion_jax/core/super_resolution.py).
  config.sr = sr = ml_collections.ConfigDict()
  # Training draws s ~ U[0, max_train_aug_level] per example (Imagen: the whole of [0, 1]).
  sr.max_train_aug_level = 1.0
  # Sampling's level. Some noise makes the model robust to the artefacts of the stage below it
  # in a cascade (Imagen sweeps 0-0.3); 0 trusts the low-resolution input exactly.
  sr.aug_level = 0.1

  # ---------------------------------------------------------------- cascade
  # A cascade (diffusion_jax/experiment/cascade.py): a base model and super-resolution stages,
  # each its own run. --mode=train trains each stage, --mode=sample draws sample.num_samples
  # images per prompt with the base and enlarges them stage by stage.
  config.cascade = cascade = ml_collections.ConfigDict()
  cascade.configs = ""  # The stages' configs, base first: "shapes_text,shapes_sr" (or .py paths).
  cascade.workdirs = ""  # Their run directories; empty: WORKDIR/<config name> for each.
  # Per-stage sampling, comma-separated, one item per stage; an empty item (or an empty field)
  # keeps that stage run's own sample.* / sr.aug_level value.
  cascade.samplers = ""
  cascade.num_steps = ""
  cascade.guidance_scales = ""
  cascade.aug_levels = ""
  cascade.batch_sizes = ""

  # ---------------------------------------------------------------- sds
  # --mode=sds: score distillation (DreamFusion, diffusion_jax/experiment/sds_mode.py). A trained
  # conditional run is the frozen prior; the parameters of a scene (3d: a voxel grid of density
  # and albedo, volume-rendered from random cameras) or of an image (2d) follow its gradient
  # w(t) (ε̂ − ε) for the prompt. Outputs go to WORKDIR/sds/.
  config.sds = sds = ml_collections.ConfigDict()
  sds.prior_workdir = "runs/shapes_text"  # The prior: a trained conditional run (pixel or latent).
  sds.prompt = "a red circle"
  # With config.pretrained set, that Stable Diffusion is the prior instead (its VAE encodes the
  # renders; the gradient flows back through the encoder), guided away from negative_prompt.
  sds.negative_prompt = ""
  sds.mode = "3d"  # "3d" (a scene seen from random cameras) or "2d" (an image).
  sds.num_steps = 400  # Optimisation steps.
  sds.batch_size = 4  # Views (3d) or noise draws (2d) per step.
  sds.learning_rate = 0.05  # Adam.
  sds.guidance_scale = 7.5  # Classifier-free guidance of the prior (DreamFusion: 100).
  sds.t_min = 0.02  # t ~ U[t_min, t_max] · T, as DreamFusion.
  sds.t_max = 0.98
  sds.weighting = "dreamfusion"  # w(t) = 1 − ᾱ_t; "uniform": 1.
  # The scene: a grid of grid_size³ vertices spanning [−1, 1]³, a density blob at the centre to
  # start from, rays of num_ray_samples samples, a pinhole camera of fov degrees.
  sds.grid_size = 32
  sds.blob_density = 6.0
  sds.blob_radius = 0.4
  sds.num_ray_samples = 32
  sds.fov = 40.0
  sds.elevation_range = (-10.0, 30.0)  # Degrees; azimuth is uniform over the whole circle.
  sds.distance_range = (3.0, 3.5)
  sds.shading = "albedo"  # "albedo", or "lambertian" (a light at the camera, ambient 0.3).
  sds.background = (0.09, 0.09, 0.09)  # RGB in [0, 1]; the shapes set's dark grey.
  # Regularisers that keep the scene solid: opacity_weight · mean √(opacity² + 0.01) (sparsity),
  # entropy_weight · the rays' opacity entropy (all or nothing), tv_weight · total variation
  # (of the density in 3d; of the image in 2d, where it keeps an encoder's gradient from painting
  # high-frequency patterns).
  sds.opacity_weight = 0.0
  sds.entropy_weight = 0.01
  sds.tv_weight = 0.0
  # Renders are render_size pixels square (0: the prior's image size), resized bilinearly to
  # the prior's size (e.g. 64 for Stable Diffusion's 512, as DreamFusion renders at 64).
  sds.render_size = 0
  sds.num_views = 16  # Views of the ring written at the end.
  sds.log_every = 10
  sds.checkpoint_every = 100

  # ---------------------------------------------------------------- eval
  # --mode=eval: the variational bound on the negative log-likelihood in bits per dimension, on
  # held-out data, with the EMA parameters. It costs num_timesteps network evaluations per image.
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.split = "test"  # tfds split of data.dataset evaluated.
  evaluation.num_examples = 10_000  # Images evaluated (from the start of the split); 0: all.
  evaluation.batch_size = 128  # Images per compiled call (global, over all devices).
  evaluation.timesteps_per_call = 1  # Timesteps per network call: fewer, bigger calls.
  evaluation.clip_x0 = True  # Clip the predicted x0 to [-1, 1] (keeps the bound valid).
  evaluation.seed = 0  # The noise of image i depends only on (seed, i).
  # What --mode=eval reports: "bpd" (the bound above) and/or the sample-quality figures "fid",
  # "kid", "is" (Inception Score), "pr" (precision/recall), comma-separated. These score
  # num_samples images drawn with the sample.* settings, or the images of `images`, against the
  # reference; they need pytorch-fid's Inception weights (README, "Sample quality").
  evaluation.metrics = "bpd"
  evaluation.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth (or .npz/.safetensors)
  evaluation.num_samples = 10_000  # Samples drawn and scored.
  evaluation.images = ""  # A folder of pictures or a .npz ("samples") scored instead of samples.
  # The reference: a statistics .npz (TTUR's mu and sigma; FID only), a folder of pictures, or
  # "" for the run's data set (split reference_split, at most num_reference images), cached.
  evaluation.reference = ""
  evaluation.reference_split = "train"
  evaluation.num_reference = 50_000
  evaluation.kid_subset_size = 1000  # torch-fidelity's default (smaller sets: their size)

  return config
