"""Tests of conditioning: labels and prompts as model inputs, the padding mask, condition dropout,
classifier-free guidance, the tokenizer and the captioned data."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import logging

from diffusion_jax import data, text
from diffusion_jax.data.shapes import ShapesSource
from diffusion_jax.experiment import generate, sample_mode, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.models import TextEncoder, TextEncoderConfig, condition_kind, make_model
from diffusion_jax.models.attention import CrossAttnBlock
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import guidance, samplers

# A text-conditional U-Net on 8x8 images with cross-attention at 8x8 and in the middle.
TEXT_MODEL = {
  "name": "unet",
  "channels": 16,
  "channel_mult": (1, 2),
  "num_res_blocks": 1,
  "attn_resolutions": (),
  "num_heads": 2,
  "num_groups": 4,
  "dropout": 0.0,
  "out_channels": 3,
  "cross_attn_resolutions": (8,),
  "text": {"vocab_size": 24, "width": 16, "num_layers": 2, "num_heads": 2, "max_length": 8},
}
CLASS_MODEL = {**TEXT_MODEL, "cross_attn_resolutions": (), "text": {}, "num_classes": 5}

# Most tests here compile whole networks: the shared compilation cache and XLA's cheap pipeline.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _init(model_config, **cond):
  model = make_model(model_config)
  x = jnp.zeros((2, 8, 8, 3))
  t = jnp.zeros((2,), jnp.int32)
  # The output layers start at zero; random parameters everywhere make the checks meaningful.
  # Only the init's shapes are used, and the values come from NumPy: compiling the init and a
  # threefry draw for each parameter shape took most of these tests' time on a CPU.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, **cond)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), shapes)
  return model, params


def _tokens(rows):
  out = np.zeros((len(rows), 8), np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return jnp.asarray(out)


def test_condition_kind_from_the_model_section():
  assert condition_kind(TEXT_MODEL) == "text"
  assert condition_kind(CLASS_MODEL) == "class"
  assert condition_kind({**CLASS_MODEL, "num_classes": 0}) == "none"
  with pytest.raises(ValueError, match="cross_attn_resolutions"):
    condition_kind({**TEXT_MODEL, "cross_attn_resolutions": ()})
  with pytest.raises(ValueError, match="both set"):
    condition_kind({**TEXT_MODEL, "num_classes": 3})


# ---------------------------------------------------------------- the padding mask


def test_cross_attention_ignores_masked_context():
  block = CrossAttnBlock(num_heads=2, num_groups=4)
  kx, kc, kn, kp = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(kx, (3, 4, 4, 8))
  context = jax.random.normal(kc, (3, 6, 5))
  mask = jnp.asarray([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  params = jax.jit(block.init)(kp, x, context, mask)["params"]
  params["proj_out"]["kernel"] = jax.random.normal(kn, params["proj_out"]["kernel"].shape)
  # One compiled block for the three contexts.
  apply = jax.jit(lambda c: block.apply({"params": params}, x, c, mask))
  out = apply(context)
  # Anything, even huge values, in the masked positions changes nothing.
  noise = 1e3 * jax.random.normal(jax.random.key(3), context.shape)
  changed = jnp.where(mask[..., None], context, noise)
  np.testing.assert_array_equal(out, apply(changed))
  # ... while a valid position does change the output.
  moved = context.at[0, 1].add(1.0)
  assert not np.allclose(out[0], apply(moved)[0])


def test_text_encoder_ignores_padded_tokens():
  encoder = TextEncoder(TextEncoderConfig(vocab_size=24, width=16, num_layers=2, num_heads=2))
  tokens = _tokens([[1, 5, 7, 9], [1, 3]])
  mask = tokens != 0
  params = jax.jit(encoder.init)(jax.random.key(0), tokens, mask)["params"]
  apply = jax.jit(lambda t: encoder.apply({"params": params}, t, mask))
  out = apply(tokens)
  # Other ids in the padded positions (the mask unchanged): the valid rows are the same.
  scrambled = jnp.where(mask, tokens, jax.random.randint(jax.random.key(4), tokens.shape, 3, 24))
  again = apply(scrambled)
  np.testing.assert_allclose(again[mask], out[mask], rtol=1e-6, atol=1e-6)
  assert not np.allclose(again[~mask], out[~mask])


def test_text_unet_ignores_padded_context():
  model, params = _init(TEXT_MODEL, tokens=_tokens([[1, 4], [1, 5, 6]]))
  unet = model.config
  from diffusion_jax.models import UNet

  net = UNet(unet)
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
  t = jnp.asarray([3, 17])
  context = jax.random.normal(jax.random.key(6), (2, 8, 16))
  mask = jnp.asarray([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]], bool)
  unet_apply = jax.jit(
    lambda c: net.apply({"params": params["unet"]}, x, t, context=c, context_mask=mask)
  )
  out = unet_apply(context)
  junk = jnp.where(
    mask[..., None], context, 50.0 * jax.random.normal(jax.random.key(7), context.shape)
  )
  np.testing.assert_array_equal(out, unet_apply(junk))
  # The prompt does matter: another prompt gives another output.
  model_apply = jax.jit(lambda tokens: model.apply({"params": params}, x, t, tokens=tokens))
  a = model_apply(_tokens([[1, 4], [1, 5, 6]]))
  b = model_apply(_tokens([[1, 9], [1, 5, 6]]))
  assert not np.allclose(a[0], b[0]) and np.allclose(a[1], b[1], atol=1e-6)


# ---------------------------------------------------------------- condition dropout


def test_drop_replaces_the_condition_with_the_null_one_at_the_given_rate():
  n, p = 4000, 0.1
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
  labels = {"labels": jnp.arange(n, dtype=jnp.int32) % 7}
  dropped = guidance.drop(labels, keys, p, num_classes=7)["labels"]
  is_null = np.asarray(dropped == 7)
  # Kept labels are untouched; the dropped fraction is within 4 standard deviations of p.
  np.testing.assert_array_equal(
    np.asarray(dropped)[~is_null], np.asarray(labels["labels"])[~is_null]
  )
  assert abs(is_null.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
  tokens = {"tokens": jnp.tile(_tokens([[1, 4, 5]]), (n, 1))}
  dropped_tokens = np.asarray(guidance.drop(tokens, keys, p)["tokens"])
  # The same examples are dropped for either kind, and a dropped prompt is the empty prompt.
  np.testing.assert_array_equal(dropped_tokens[:, 1] == 0, is_null)
  np.testing.assert_array_equal(
    dropped_tokens[is_null], np.asarray(_tokens([[1]]))[[0] * is_null.sum()]
  )


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("kind", ["class", "text"])
def test_guidance_combines_the_conditional_and_unconditional_outputs(kind):
  cond = (
    {"labels": jnp.asarray([1, 3])} if kind == "class" else {"tokens": _tokens([[1, 4], [1, 5, 6]])}
  )
  model, params = _init(CLASS_MODEL if kind == "class" else TEXT_MODEL, **cond)
  # Compiled once per batch size (B and 2B), not run op by op; each output below comes from
  # the same compiled network as the output it is compared with.
  apply_fn = jax.jit(lambda x, t, **c: model.apply({"params": params}, x, t, **c))
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3))
  t = jnp.asarray([2, 11])
  null = guidance.null_like(cond, num_classes=5)
  out_c, out_u = apply_fn(x, t, **cond), apply_fn(x, t, **null)
  assert not np.allclose(out_c, out_u, atol=1e-4)
  guided = lambda w: guidance.guided(apply_fn, cond, w, num_classes=5)(x, t)
  np.testing.assert_array_equal(guided(1.0), out_c)
  np.testing.assert_array_equal(guided(0.0), out_u)
  # The two-halves path (one network call on 2B examples) against the formula, and near the
  # end points it approaches them.
  np.testing.assert_allclose(guided(3.0), out_u + 3.0 * (out_c - out_u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided(1.0 + 1e-7), out_c, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided(1e-7), out_u, rtol=1e-5, atol=1e-5)


def test_guidance_keeps_the_conditional_learned_variance():
  out_c = jnp.arange(12.0).reshape(1, 1, 2, 6)
  out_u = -out_c
  mixed = guidance.combine(out_c, out_u, 2.0, data_channels=3)
  np.testing.assert_array_equal(
    mixed[..., :3], out_u[..., :3] + 2.0 * (out_c[..., :3] - out_u[..., :3])
  )
  np.testing.assert_array_equal(mixed[..., 3:], out_c[..., 3:])


def test_sampling_with_guidance_one_is_the_conditional_model_and_zero_the_unconditional():
  cond = {"tokens": _tokens([[1, 4], [1, 5, 6]])}
  model, params = _init(TEXT_MODEL, **cond)
  from diffusion_jax.core.schedules import make_schedule

  schedule = make_schedule("cosine", 20)
  mesh = jax.make_mesh((1,), ("data",))
  options = dict(sampler="ddim", num_steps=5, prediction="eps", to_uint8=False)
  key = jax.random.key(9)

  def run(scale, condition):
    fn = generate.make_sample_fn(
      model, schedule, (8, 8, 3), 2, mesh, guidance_scale=scale, **options
    )
    return np.asarray(fn(params, key, 0, condition))

  @jax.jit
  def plain(condition):
    denoise = lambda x, t: model.apply({"params": params}, x, t, **condition)
    return samplers.sample(denoise, schedule, (2, 8, 8, 3), key, sampler="ddim", num_steps=5)

  # Two compiled programs: equal up to float rounding, which 5 DDIM steps amplify to ~1e-4.
  conditional = run(1.0, cond)
  np.testing.assert_allclose(conditional, plain(cond), atol=2e-4)
  np.testing.assert_allclose(run(0.0, cond), plain(guidance.null_like(cond)), atol=2e-4)
  assert not np.allclose(run(4.0, cond), conditional, atol=1e-3)


# ---------------------------------------------------------------- tokenizer and captions


def test_tokenizer_round_trip_unknown_words_and_the_empty_prompt(caplog):
  source = ShapesSource(10, 16)
  tokenizer = text.tokenizer_for(source, 12)
  for prompt in (
    "a blue triangle",
    "a small red circle in the top left",
    "a large green square at the bottom",
  ):
    ids = tokenizer.encode([prompt])[0]
    assert ids[0] == text.START_ID and tokenizer.decode(ids) == prompt
  # The empty prompt is the null condition that training and guidance use.
  np.testing.assert_array_equal(
    tokenizer.encode([""]),
    np.asarray(guidance.null_like({"tokens": jnp.zeros((1, 12), jnp.int32)})["tokens"]),
  )
  with caplog.at_level(logging.WARNING):
    ids = tokenizer.encode(["a purple triangle"])[0]
  assert "'purple'" in caplog.text and "never seen" in caplog.text
  assert list(ids[:4]) == [
    text.START_ID,
    tokenizer.encode_one("a")[1],
    text.UNK_ID,
    tokenizer.encode_one("triangle")[1],
  ]


def test_captions_name_the_image_and_batches_carry_them(tiny_config):
  source = ShapesSource(200, 16)
  tokenizer = text.tokenizer_for(source, 12)
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(200):
    caption, a = source.caption(i, rng), source.attributes(i)
    assert f"{a['colour']} {a['shape']}" in caption
    if a["size"] in caption:
      seen.add("size")
    if a["position"].split()[-1] in caption.split():
      seen.add("position")
    assert set(text.split_words(caption)) <= set(tokenizer.vocabulary)
  assert seen == {"size", "position"}

  config = tiny_config({"data.random_flip": False})
  it = data.make_train_iterator(config.data, global_batch_size=8, seed=0, tokenizer=tokenizer)
  again = data.make_train_iterator(
    config.data, global_batch_size=8, seed=0, tokenizer=tokenizer, start_step=1
  )
  batch, second = next(it), next(it)
  np.testing.assert_array_equal(second["tokens"], next(again)["tokens"])
  names = ShapesSource(1, 8).class_names
  for label, ids in zip(batch["label"], batch["tokens"], strict=True):
    assert names[label] in tokenizer.decode(ids)


def test_excluded_classes_leave_the_training_split(tiny_config):
  config = tiny_config({"data.exclude_classes": "green triangle, blue square"})
  labels = {int(data.make_source(config.data)[i]["label"]) for i in range(64)}
  names = ShapesSource(1, 8).class_names
  assert {names[i] for i in labels} == set(names) - {"green triangle", "blue square"}
  config.data.split = "test"
  assert len({int(data.make_source(config.data)[i]["label"]) for i in range(64)}) == 12


# ---------------------------------------------------------------- training and sampling


def _text_overrides():
  # With tiny_config(..., text=True): the tiny setup's one-level U-Net, with cross-attention in
  # the middle and in the up path's block at 8x8: what the tests of the run check (prompts
  # reaching the samples, guidance, the bound of the unconditional model) does not depend on
  # depth, and two levels with a block each took more than twice as long to compile.
  return {
    "train.num_steps": 3,
    "train.sample_every": 0,
    "train.num_grid_samples": 12,
  }


@pytest.fixture(scope="module")
def text_run(tiny_config, tmp_path_factory, fast_compile):
  """A 3-step text-conditional run of the tiny setup: (config, workdir)."""
  config = tiny_config(_text_overrides(), text=True)
  workdir = tmp_path_factory.mktemp("text_run")
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def test_sample_mode_draws_each_prompt_with_guidance(text_run, tmp_path, caplog):
  config, workdir = text_run
  config = ml_collections.ConfigDict(config.to_dict())
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("a blue triangle\n# a comment\n\na small red circle at the top\n")
  config.sample.prompts_file = str(prompts_file)
  config.sample.guidance_scale = 3.0
  config.sample.num_samples = 3
  png, npz, samples = sample_mode.sample_from_checkpoint(config, str(workdir))
  assert png.endswith("samples_0000003_seed0_w3.png")
  with np.load(npz) as f:
    assert list(f["prompts"]) == ["a blue triangle", "a small red circle at the top"]
    assert float(f["guidance_scale"]) == 3.0 and f["samples"].shape == (6, 8, 8, 3)
  # The single prompts below: the samples --mode=sample draws (`draw_with`, no files written),
  # one compiled sampler per guidance scale.
  run = run_lib.make_run(config)
  params = sample_mode.restore(run, str(workdir)).ema_params
  guided = run.sample_fn()
  # One prompt with a word the tokenizer has never seen: a warning, and images all the same.
  config.sample.prompts_file = ""
  config.sample.prompt = "a purple triangle"
  with caplog.at_level(logging.WARNING):
    odd = sample_mode.draw_with(run, guided, params, config, 3)
  assert "'purple'" in caplog.text and odd.shape == (3, 8, 8, 3)
  # The empty prompt is unconditional: with any guidance scale it draws what scale 0 draws.
  config.sample.prompt = ""
  empty = sample_mode.draw_with(run, guided, params, config, 3)
  config.sample.prompt, config.sample.guidance_scale = "a blue triangle", 0.0
  run = run_lib.make_run(config)
  unconditional = sample_mode.draw_with(run, run.sample_fn(), params, config, 3)
  # (Up to a rounding step of a pixel: the guided call runs the network on a batch twice as big.)
  assert np.abs(empty.astype(int) - unconditional.astype(int)).max() <= 1


def test_prompts_for_an_unconditional_model_are_an_error(tiny_config, tmp_path):
  config = tiny_config()
  run = run_lib.make_run(config)
  config.sample.prompt = "a red circle"
  with pytest.raises(ConfigError, match="unconditional"):
    sample_mode.prompts(run, config)
  text_config = tiny_config(_text_overrides(), text=True)
  text_config.sample.prompts_file = str(tmp_path / "missing.txt")
  with pytest.raises(ConfigError, match="cannot be read"):
    sample_mode.prompts(run_lib.make_run(text_config), text_config)


@pytest.fixture(scope="module")
def class_run(tiny_config, tmp_path_factory, fast_compile):
  """A 3-step class-conditional run of the tiny setup: (config, workdir, final metrics)."""
  config = tiny_config(
    {
      "model.num_classes": 12,
      "train.num_steps": 3,
      "train.sample_every": 0,
      "train.num_grid_samples": 12,
    }
  )
  workdir = tmp_path_factory.mktemp("class_run")
  return config, workdir, train.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize("kind", ["class", "text"])
def test_conditional_training_writes_a_row_per_class(request, kind):
  workdir = request.getfixturevalue(f"{kind}_run")[1]
  with np.load(workdir / "samples" / "step_0000003_dpm_solver++_20steps.npz") as f:
    prompts, samples = list(f["prompts"]), f["samples"]
  assert prompts == [text.class_caption(n) for n in ShapesSource(1, 8).class_names]
  assert samples.shape == (12, 8, 8, 3)
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)


def test_class_conditional_sampling_by_class_name(class_run):
  config, workdir, _ = class_run
  config = ml_collections.ConfigDict(config.to_dict())
  config.sample.prompt, config.sample.guidance_scale = "a blue triangle", 2.0
  png, npz, samples = sample_mode.sample_from_checkpoint(config, str(workdir))
  assert png.endswith("_w2.png") and samples.shape == (4, 8, 8, 3)
  config.sample.prompt = "a purple blob"
  with pytest.raises(ConfigError, match="names no class"):
    sample_mode.sample_from_checkpoint(config, str(workdir))


def test_prompt_errors_and_warnings(tiny_config):
  run = run_lib.make_run(tiny_config({"model.num_classes": 12}))
  np.testing.assert_array_equal(
    run.prompt_condition(["red circle", "a blue triangle", ""])["labels"], [0, 10, 12]
  )
  with pytest.raises(ConfigError, match="names no class"):
    run.prompt_condition(["a purple blob"])
  with pytest.raises(ConfigError, match="unconditional"):
    run_lib.make_run(tiny_config()).prompt_condition(["a red circle"])
  with pytest.raises(ConfigError, match="model.num_classes=3"):
    run_lib.make_run(tiny_config({"model.num_classes": 3}))
  with pytest.raises(ConfigError, match="vocab_size"):
    run_lib.make_run(tiny_config({**_text_overrides(), "model.text.vocab_size": 8}, text=True))


def test_image_folder_captions_come_from_class_names(tmp_path):
  from PIL import Image

  for name in ("cat", "airplane", "sports car"):
    (tmp_path / name).mkdir()
    Image.new("RGB", (10, 12), (200, 10, 10)).save(tmp_path / name / "0.png")
  config = ml_collections.ConfigDict({"dataset": "folder", "path": str(tmp_path), "image_size": 8})
  source = data.make_source(config)
  tokenizer = text.tokenizer_for(source, 6)
  assert tokenizer.vocabulary[3:] == ["a", "airplane", "an", "car", "cat", "sports"]
  caption = text.make_captioner(source)
  rng = np.random.default_rng(0)
  captions = [caption(i, source[i]["label"], rng) for i in range(len(source))]
  assert sorted(captions) == ["a cat", "a sports car", "an airplane"]
  assert text.default_prompts(source) == ["an airplane", "a cat", "a sports car"]


def test_eval_of_a_text_model_is_the_bound_of_its_unconditional_model(text_run):
  from diffusion_jax.core import likelihood, rng
  from diffusion_jax.experiment import eval_mode
  from diffusion_jax.runtime.checkpoints import CheckpointStore

  config, workdir = text_run
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.num_examples, config.eval.batch_size = 3, 4
  result, _ = eval_mode.evaluate(config, str(workdir))
  run = run_lib.make_run(config)
  store = CheckpointStore(str(workdir / "checkpoints"))
  params = run_lib.restore_or_init(run, store).ema_params
  store.close()
  source = eval_mode._eval_source(config)
  images = np.stack([source[i]["image"] for i in range(3)])
  key = rng.stream_key(config.eval.seed, rng.EVAL)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(3, dtype=jnp.uint32))
  empty = jnp.asarray(run.tokenizer.encode([""] * 3))

  # Compiled once for both prompts (the same shapes), not run eagerly twice.
  @jax.jit
  def bits_per_dim(tokens):
    return likelihood.bits_per_dim(
      run.schedule,
      lambda x_t, t: run.model.apply({"params": params}, x_t, t, tokens=tokens),
      data.normalize_images(images),
      keys,
      variance=config.diffusion.variance,
      prediction=config.diffusion.prediction,
      clip_x0=config.eval.clip_x0,
    )["bits_per_dim"]

  def bound(tokens):
    return float(np.mean(bits_per_dim(tokens)))

  assert result["bits_per_dim"] == pytest.approx(bound(empty), rel=1e-5)
  # The figure depends on the prompt: a real caption gives another bound.
  assert bound(jnp.asarray(run.tokenizer.encode(["a red circle"] * 3))) != pytest.approx(
    result["bits_per_dim"], rel=1e-6
  )
