"""Where a CPU train step loses time: the 3x3 convolution's forward pass, input gradient and
weight gradient, against the float32 matmul peak, at the CIFAR-10 network's layer shapes.

Run from the repository root:
  python benchmarks/conv_grad.py                       # batch 32, the four widths of the network
  python benchmarks/conv_grad.py --batch=64 --repeats=9

For each (size, channels) of the DDPM CIFAR-10 U-Net's 3x3 convolutions it times, jitted and in
float32: the forward convolution, its gradient with respect to the input and with respect to the
weight as XLA computes them, and the weight gradient computed as matrix products instead (the
input's 3x3 patches of `--chunk` images at a time against the output gradient, accumulated in
a scan: the patches stay in cache), and all three passes in one program. The single passes have
the same FLOPs (2 B H W 9 C_in C_out), the three together three times that; the table gives
GFLOP/s as the median (min–max) of --repeats calls after one untimed call, next to the float32
matmul of --matmul_size on the same machine.

With --winograd it also times all three passes of Winograd's algorithm (`models.winograd`,
F(2x2, 3x3) and F(4x4, 3x3), JAX's autodiff for the gradients), counted at the direct
convolution's FLOPs so that the rates compare as speeds, and checks them against XLA's.

With --peer (PyTorch installed, as in the environment of `peer_diffusers.py`) it also times
PyTorch's convolution (oneDNN on a CPU, channels-last float32) at the same shapes: the forward
pass, and the forward pass with both gradients, whose rate is compared with XLA's three passes.
"""

import os
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax.models.fast import winograd  # noqa: E402
from diffusion_jax.runtime import hostmem  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Images per call.")
flags.DEFINE_integer("chunk", 2, "Images per patch matrix of the matrix-product weight gradient.")
flags.DEFINE_integer("repeats", 7, "Timed calls per measurement; the median is reported.")
flags.DEFINE_integer("matmul_size", 4096, "N of the N x N float32 matmul giving the peak.")
flags.DEFINE_bool("peer", False, "Also time PyTorch's convolution (needs torch).")
flags.DEFINE_bool("winograd", False, "Also time Winograd's F(2x2, 3x3) and F(4x4, 3x3).")

# (feature-map size, input channels, output channels) of the CIFAR-10 network's 3x3 convolutions.
SHAPES = ((32, 128, 128), (16, 256, 256), (8, 256, 256), (4, 256, 256))


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def weight_grad_matmul(x, g, chunk: int):
  """dL/dw of `conv` from the input x [B, H, W, Ci] and output gradient g [B, H, W, Co]."""
  b, h, w, cin = x.shape
  cout = g.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b // chunk, chunk, h + 2, w + 2, cin)
  gc = g.reshape(b // chunk, chunk * h * w, cout)

  def body(acc, inputs):
    xc, gcc = inputs
    patches = [xc[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    patches = jnp.concatenate(patches, axis=-1).reshape(-1, 9 * cin)
    return acc + lax.dot_general(patches, gcc, (((0,), (0,)), ((), ()))), None

  acc, _ = lax.scan(body, jnp.zeros((9 * cin, cout), x.dtype), (xp, gc))
  return acc.reshape(3, 3, cin, cout)


def rates(call, flop_count) -> list[float]:
  """GFLOP/s of each of --repeats calls of `call` (which blocks) after one untimed call."""
  return [flop_count / t / 1e9 for t in timing.timed(call, 1, FLAGS.repeats)]


def jit_rates(fn, args, flop_count) -> list[float]:
  """GFLOP/s of repeated calls of `fn`, compiled for `args`."""
  compiled = jax.jit(fn).lower(*args).compile()
  return rates(lambda: jax.block_until_ready(compiled(*args)), flop_count)


def gflops(fn, args, flop_count) -> str:
  return timing.median_range(jit_rates(fn, args, flop_count))


def peer_rates(x, w, g, flop_count) -> tuple[list[float], list[float]]:
  """PyTorch's GFLOP/s for the forward pass and for the forward pass with both gradients."""
  import torch  # noqa: PLC0415 (only in the peer's environment)

  to_torch = lambda a, perm: torch.from_numpy(np.asarray(a).transpose(perm).copy())
  channels_last = torch.channels_last
  xt = to_torch(x, (0, 3, 1, 2)).contiguous(memory_format=channels_last).requires_grad_()
  wt = to_torch(w, (3, 2, 0, 1)).contiguous(memory_format=channels_last).requires_grad_()
  gt = to_torch(g, (0, 3, 1, 2)).contiguous(memory_format=channels_last)
  conv_t = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)
  dx, dw = torch.autograd.grad(conv_t(), (xt, wt), gt)
  np.testing.assert_allclose(
    dx.permute(0, 2, 3, 1).numpy(), np.asarray(x_grad(x, w, g)), 1e-3, 0.05
  )
  np.testing.assert_allclose(
    dw.permute(2, 3, 1, 0).numpy(), np.asarray(w_grad(x, w, g)), 1e-3, 0.05
  )
  with torch.no_grad():
    forward = rates(conv_t, flop_count)
  both = rates(lambda: torch.autograd.grad(conv_t(), (xt, wt), gt), 3 * flop_count)
  return forward, both


def x_grad(x, w, g):
  return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]


def w_grad(x, w, g):
  return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def three_passes(x, w, g, conv=conv):
  """The forward pass and both gradients, as a train step needs them."""
  y, vjp = jax.vjp(conv, x, w)
  return y, *vjp(g)


def winograd_rates(x, w, g, m: int, flop_count) -> list[float]:
  """GFLOP/s (direct-convolution FLOPs) of the three passes by Winograd's F(m x m, 3 x 3)."""
  passes = lambda x, w, g: three_passes(x, w, g, lambda x, w: winograd.conv3x3(x, w, m))
  expected = jax.jit(three_passes)(x, w, g)
  for actual, reference in zip(jax.jit(passes)(x, w, g), expected, strict=True):
    np.testing.assert_allclose(actual, reference, 1e-3, 1e-3 * float(jnp.max(jnp.abs(reference))))
  return jit_rates(passes, (x, w, g), 3 * flop_count)


def main(argv):
  del argv
  hostmem.configure(True)  # Before JAX starts its CPU client, as main.py does by default.
  b = FLAGS.batch
  header = (
    "| feature map | C_in → C_out | GFLOP / call | forward | input gradient | weight gradient "
    "(XLA) | weight gradient (patch matmuls) | all three |"
  )
  rule = "|---|---|--:|--:|--:|--:|--:|--:|"
  if FLAGS.winograd:
    header += " Winograd F(2×2), all three | Winograd F(4×4), all three |"
    rule += "--:|--:|"
  if FLAGS.peer:
    header += " PyTorch forward | PyTorch, all three | all three, XLA / PyTorch |"
    rule += "--:|--:|--:|"
  lines = [
    f"Device: {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
    f"batch {b}, float32; GFLOP/s, median (min–max) of {FLAGS.repeats} calls.",
    "",
    header,
    rule,
  ]
  for size, cin, cout in SHAPES:
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, size, size, cin))
    w = 0.05 * jax.random.normal(kw, (3, 3, cin, cout))
    g = jax.random.normal(kg, (b, size, size, cout))
    count = 2 * b * size * size * 9 * cin * cout
    dw_mm = lambda x, w, g: weight_grad_matmul(x, g, FLAGS.chunk)
    np.testing.assert_allclose(jax.jit(dw_mm)(x, w, g), jax.jit(w_grad)(x, w, g), 1e-3, 0.05)
    cells = [gflops(conv, (x, w), count)]
    cells += [gflops(f, (x, w, g), count) for f in (x_grad, w_grad, dw_mm)]
    ours = jit_rates(three_passes, (x, w, g), 3 * count)
    cells.append(timing.median_range(ours))
    if FLAGS.winograd:
      cells += [timing.median_range(winograd_rates(x, w, g, m, count)) for m in (2, 4)]
    if FLAGS.peer:
      forward, both = peer_rates(x, w, g, count)
      ratio = statistics.median(ours) / statistics.median(both)
      cells += [timing.median_range(forward), timing.median_range(both), f"{ratio:.2f}"]
    lines.append(
      f"| {size}×{size} | {cin} → {cout} | {count / 1e9:.2f} | " + " | ".join(cells) + " |"
    )
  n = FLAGS.matmul_size
  a = jax.random.normal(jax.random.key(1), (n, n))
  lines += ["", f"float32 matmul {n}×{n}: {gflops(jnp.matmul, (a, a), 2 * n**3)} GFLOP/s"]
  if FLAGS.peer:
    import torch  # noqa: PLC0415

    at = torch.from_numpy(np.array(a))
    peer = timing.median_range(rates(lambda: at @ at, 2 * n**3))
    lines.append(f"PyTorch {torch.__version__} float32 matmul {n}×{n}: {peer} GFLOP/s")
  lines.append("")
  lines.append("Command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
