"""Where a CPU train step loses time: the 3x3 convolution's forward pass, input gradient and
weight gradient, against the float32 matmul peak, at the CIFAR-10 network's layer shapes.

Run from the repository root:
  python benchmarks/conv_grad.py                       # batch 32, the four widths of the network
  python benchmarks/conv_grad.py --batch=64 --repeats=9

For each (size, channels) of the DDPM CIFAR-10 U-Net's 3x3 convolutions it times, jitted and in
float32: the forward convolution, its gradient with respect to the input and with respect to the
weight as XLA computes them, and the weight gradient computed as matrix products instead (the
input's 3x3 patches of `--chunk` images at a time against the output gradient, accumulated in
a scan: the patches stay in cache). All have the same FLOPs (2 B H W 9 C_in C_out); the table
gives GFLOP/s as the median (min–max) of --repeats calls after one untimed call, next to the
float32 matmul of --matmul_size on the same machine.
"""

import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Images per call.")
flags.DEFINE_integer("chunk", 2, "Images per patch matrix of the matrix-product weight gradient.")
flags.DEFINE_integer("repeats", 7, "Timed calls per measurement; the median is reported.")
flags.DEFINE_integer("matmul_size", 4096, "N of the N x N float32 matmul giving the peak.")

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


def gflops(fn, args, flop_count):
  compiled = jax.jit(fn).lower(*args).compile()
  times = timing.timed(lambda: jax.block_until_ready(compiled(*args)), 1, FLAGS.repeats)
  return timing.median_range([flop_count / t / 1e9 for t in times])


def main(argv):
  del argv
  b = FLAGS.batch
  lines = [
    f"Device: {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
    f"batch {b}, float32; GFLOP/s, median (min–max) of {FLAGS.repeats} calls.",
    "",
    "| feature map | C_in → C_out | GFLOP / call | forward | input gradient | weight gradient "
    "(XLA) | weight gradient (patch matmuls) |",
    "|---|---|--:|--:|--:|--:|--:|",
  ]
  for size, cin, cout in SHAPES:
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, size, size, cin))
    w = 0.05 * jax.random.normal(kw, (3, 3, cin, cout))
    g = jax.random.normal(kg, (b, size, size, cout))
    count = 2 * b * size * size * 9 * cin * cout
    dx = lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
    dw = lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]
    dw_mm = lambda x, w, g: weight_grad_matmul(x, g, FLAGS.chunk)
    np.testing.assert_allclose(jax.jit(dw_mm)(x, w, g), jax.jit(dw)(x, w, g), rtol=1e-3, atol=0.05)
    cells = [gflops(f, (x, w, g), count) for f in (dx, dw, dw_mm)]
    cells.insert(0, gflops(conv, (x, w), count))
    lines.append(
      f"| {size}×{size} | {cin} → {cout} | {count / 1e9:.2f} | " + " | ".join(cells) + " |"
    )
  n = FLAGS.matmul_size
  a = jax.random.normal(jax.random.key(1), (n, n))
  lines += ["", f"float32 matmul {n}×{n}: {gflops(jnp.matmul, (a, a), 2 * n**3)} GFLOP/s", ""]
  lines.append("Command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
