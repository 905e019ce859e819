"""Tests of sampling's progress bar and its stop on signals: the bar counts every network call of
every batch, the samples are bitwise those of the plain sampler, a stop request aborts a running
compiled call within a step, and real signals become stop requests (a second one exits)."""

import io
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from diffusion_jax.experiment import generate, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import interrupts
from diffusion_jax.runtime.errors import SamplingStopped, TrainingStopped

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_SAMPLES, BATCH = 10, 4  # 3 batches, the last one partly filled
# The tiny config's T = 20: 20 network calls per batch with ddpm.
CALLS = 20


@pytest.fixture(scope="module")
def setup(tiny_config, fast_compile):
  run = run_lib.make_run(tiny_config())
  params = run.init_state(jax.random.key(0)).params
  # The last layer starts at zero; perturbed weights make every image depend on the network.
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.1 * noise.standard_normal(x.shape, x.dtype), params)
  plain = run.sample_fn(to_uint8=False)
  reference = generate.generate(plain, params, jax.random.key(1), NUM_SAMPLES, BATCH)
  return run, params, plain, reference


def bar_states(text):
  """(count, total) of each state the bar printed."""
  return [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) \[", text)]


def test_the_bar_counts_every_call_and_the_samples_stay_bitwise_the_same(setup):
  run, params, plain, reference = setup
  stream = io.StringIO()
  sample_fn = run.sample_fn(to_uint8=False, progress=generate.SampleProgress(file=stream))
  for _ in range(2):
    samples = generate.generate(sample_fn, params, jax.random.key(1), NUM_SAMPLES, BATCH)
    np.testing.assert_array_equal(samples, reference)
  text = stream.getvalue()
  assert "sampling 10 images" in text and "batch 3/3" in text
  total = 3 * CALLS
  assert bar_states(text)[-1] == (total, total)
  assert all(t == total and n <= total for n, t in bar_states(text))
  # One compiled program for every call; the plain one has no host callback at all.
  assert sample_fn._cache_size() == 1
  args = (params, jax.random.key(1), np.int32(0), {})
  assert "python_cpu_callback" in sample_fn.lower(*args).as_text()
  assert "python_cpu_callback" not in plain.lower(*args).as_text()
  assert not hasattr(plain, "progress")


def test_heun_counts_its_two_calls_per_step_and_show_false_draws_nothing(setup, capfd):
  run, params, _, _ = setup
  stream = io.StringIO()
  options = dict(to_uint8=False, sampler="heun", num_steps=4)
  heun = run.sample_fn(progress=generate.SampleProgress(file=stream), **options)
  samples = generate.generate(heun, params, jax.random.key(1), BATCH, BATCH)
  assert bar_states(stream.getvalue())[-1] == (7, 7)  # 2 * 4 - 1 network calls
  quiet = run.sample_fn(progress=generate.SampleProgress(show=False), **options)
  np.testing.assert_array_equal(
    generate.generate(quiet, params, jax.random.key(1), BATCH, BATCH), samples
  )
  captured = capfd.readouterr()
  assert "sampling" not in captured.err + captured.out


def stop_after(monkeypatch, num_checks, signal_name="SIGTERM"):
  """Makes `interrupts.sampling_stop` report `signal_name` from its (num_checks + 1)-th call on;
  returns the list of its calls."""
  calls = []

  def fake():
    calls.append(1)
    return signal_name if len(calls) > num_checks else None

  monkeypatch.setattr(interrupts, "sampling_stop", fake)
  return calls


def test_a_stop_request_aborts_the_running_call_at_the_next_step(setup, monkeypatch):
  run, params, _, reference = setup
  stream = io.StringIO()
  sample_fn = run.sample_fn(to_uint8=False, progress=generate.SampleProgress(file=stream))
  # generate checks once before each batch (on the main thread), the callback at each call.
  calls = stop_after(monkeypatch, 1 + CALLS + 1 + 5)
  with pytest.raises(SamplingStopped, match="stopped by SIGTERM while sampling") as stopped:
    generate.generate(sample_fn, params, jax.random.key(1), NUM_SAMPLES, BATCH)
  assert stopped.value.signal_name == "SIGTERM"
  # The second batch's call was aborted at its 6th network call: no later call checked.
  assert len(calls) == 1 + CALLS + 1 + 6
  assert bar_states(stream.getvalue())[-1] == (CALLS + 5, 3 * CALLS)
  # jax forgot the aborted call: nothing fails later, and the same program samples again.
  monkeypatch.undo()
  jax.effects_barrier()
  samples = generate.generate(sample_fn, params, jax.random.key(1), NUM_SAMPLES, BATCH)
  np.testing.assert_array_equal(samples, reference)
  assert sample_fn._cache_size() == 1


def test_a_stop_during_a_training_grid_saves_that_step_and_resumes(
  tiny_config, fast_compile, tmp_path, monkeypatch
):
  # Step 3 draws a grid but is no checkpoint step; the stop comes at the grid's 6th network call.
  config = tiny_config({"train.checkpoint_every": 6})
  workdir = str(tmp_path)
  calls = stop_after(monkeypatch, 1 + 5)
  with pytest.raises(TrainingStopped) as stopped:
    train.train_and_evaluate(config, workdir)
  assert (stopped.value.signal_name, stopped.value.step) == ("SIGTERM", 3)
  assert len(calls) == 1 + 6  # the call was aborted at once, with no further check
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  assert not os.path.exists(os.path.join(workdir, "samples"))  # no grid of step 3
  monkeypatch.undo()
  train.train_and_evaluate(config, workdir)  # resumes at step 3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  grids = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert grids == ["step_0000006_dpm_solver++_20steps.npz", "step_0000006_dpm_solver++_20steps.png"]


def test_a_pending_stop_dispatches_nothing_even_without_progress(setup):
  run, params, plain, _ = setup
  with interrupts.stop_sampling_on_signals() as stop:
    stop.signal_name = "SIGINT"
    with pytest.raises(SamplingStopped) as stopped:
      generate.generate(plain, params, jax.random.key(1), NUM_SAMPLES, BATCH)
  assert stopped.value.signal_name == "SIGINT"
  assert interrupts.sampling_stop() is None  # the request left with its block


def test_a_real_sigint_during_a_compiled_call_stops_it(setup, monkeypatch):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be set in the main thread")
  run, params, _, _ = setup
  sample_fn = run.sample_fn(to_uint8=False, progress=generate.SampleProgress(show=False))
  real = interrupts.sampling_stop
  checks = []

  def send_at_the_third_call():
    # Runs in the callback, while the main thread waits for the compiled call.
    checks.append(1)
    if len(checks) == 3:
      os.kill(os.getpid(), signal.SIGINT)
      deadline = time.monotonic() + 10
      while real() is None and time.monotonic() < deadline:
        time.sleep(0.001)  # lets the watcher thread read the signal
    return real()

  monkeypatch.setattr(interrupts, "sampling_stop", send_at_the_third_call)
  with interrupts.stop_sampling_on_signals() as stop:
    with pytest.raises(SamplingStopped) as stopped:
      generate.generate(sample_fn, params, jax.random.key(1), BATCH, BATCH)
  assert stopped.value.signal_name == "SIGINT" and stop.signal_name == "SIGINT"
  assert len(checks) == 3  # 1 before the call, 2 in it: aborted at the call that saw the signal


def test_sigint_becomes_a_stop_request_and_the_handlers_come_back():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be set in the main thread")
  received = []
  original = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    shared = interrupts.StopRequest()
    with interrupts.stop_sampling_on_signals(shared) as stop:
      assert stop is shared and interrupts.sampling_stop() is None
      signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt, and not the previous handler
      deadline = time.monotonic() + 10
      while stop.signal_name is None and time.monotonic() < deadline:
        time.sleep(0.001)
      assert stop.signal_name == "SIGINT" and interrupts.sampling_stop() == "SIGINT"
      assert received == []
    assert {s: signal.getsignal(s) for s in before} == before
    assert interrupts.sampling_stop() is None
    # The wakeup fd is back too (none was set).
    assert signal.set_wakeup_fd(-1) == -1
    signal.raise_signal(signal.SIGINT)
    assert received == [signal.SIGINT]
  finally:
    signal.signal(signal.SIGINT, original)


def test_a_second_signal_exits_at_once_with_130():
  script = textwrap.dedent(
    """
    import signal, time
    from diffusion_jax.runtime import interrupts
    with interrupts.stop_sampling_on_signals() as stop:
      signal.raise_signal(signal.SIGINT)
      while stop.signal_name is None:
        time.sleep(0.001)
      signal.raise_signal(signal.SIGINT)
      time.sleep(30)
    print("not reached")
    """
  )
  start = time.monotonic()
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 130, result.stderr
  assert "SIGINT again: exiting now" in result.stderr and "not reached" not in result.stdout
  assert time.monotonic() - start < 25


MULTI_DEVICE = """
import io, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import TINY_OVERRIDES
from parallel_worker import make_config
from diffusion_jax.experiment import generate
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import interrupts
from diffusion_jax.runtime.errors import SamplingStopped

run = run_lib.make_run(make_config(TINY_OVERRIDES))
assert run.mesh.size == 4
params = run.init_state(jax.random.key(0)).params
stream = io.StringIO()
sample_fn = run.sample_fn(to_uint8=False, progress=generate.SampleProgress(file=stream))
plain = run.sample_fn(to_uint8=False)
a = generate.generate(sample_fn, params, jax.random.key(1), 8, 4)
b = generate.generate(plain, params, jax.random.key(1), 8, 4)
print("equal", np.array_equal(a, b))
print("bar", stream.getvalue().replace("\\r", "\\n").strip().splitlines()[-1])
calls = []
def fake():
  calls.append(1)
  return "SIGTERM" if len(calls) > 1 else None
interrupts.sampling_stop = fake
try:
  generate.generate(sample_fn, params, jax.random.key(1), 8, 4)
except SamplingStopped as e:
  print("stopped", e.signal_name, len(calls))
"""


def test_four_devices_count_each_call_once_and_all_stop(fast_compile_env):
  env = {**os.environ, **fast_compile_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run(
    [sys.executable, "-c", MULTI_DEVICE],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "equal True" in lines
  assert [line for line in lines if line.startswith("bar")][0].count(f"{2 * CALLS}/{2 * CALLS}")
  # 1 check before the call, then each of the 4 devices checks once per network call: each sees
  # the stop at the first step and no device goes on to a second one.
  stopped = [line for line in lines if line.startswith("stopped")]
  assert stopped and stopped[0].split()[1] == "SIGTERM"
  assert 2 <= int(stopped[0].split()[2]) <= 1 + 4, stopped
