"""The train step compiled for an NVIDIA H100 on a machine without one: its kernels, statically.

Run from the repository root, in an environment that also has JAX's CUDA plugin (a benchmark-only
dependency, as the PyTorch peer is: `pip install "jax[cuda12]==<the installed jax version>"`):
  python benchmarks/gpu_compile.py --config.model.dtype=bfloat16 --config.model.attention=fused
  python benchmarks/gpu_compile.py --batch=128 --out_dir=/tmp/h100   # also kernels.tsv, hlo.txt.gz

XLA compiles for a GPU it is only told about (its "target config": compute capability, memory,
bandwidth, cores), through JAX's deviceless topology API, with autotuning off as there is nothing
to time on. The program is the one a GPU would run up to the autotuned choices (convolution
algorithms, GEMM tilings), so its kernels (every fusion, library call and copy the step
launches) and the bytes each reads and writes can be counted here. Nothing is run, so nothing is
measured: the modelled time of the memory-bound kernels (everything but cuDNN and cuBLAS calls
and GEMM fusions) is a model, sum(max(bytes / bandwidth, floor)), with the bandwidth and the
per-kernel floor of benchmarks/results/train_step_gpu.md's H100 profile. It is meant for
comparing versions of the step on a GPU: kernel counts and bytes are exact, the time is an estimate.
"""

import collections
import dataclasses
import gzip
import math
import os
import re
import shlex
import sys
import time

if __name__ == "__main__":
  # Before JAX starts: a CPU default backend (there is no GPU to initialise), and the CUDA plugin
  # loaded without its check of the local GPU's driver.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.models import condition_kind  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that tests can import the module)."""
  config_flags.DEFINE_config_file(
    "config", "configs/cifar10.py", "Config whose train step is compiled.", lock_config=True
  )
  flags.DEFINE_integer("batch", 128, "Global batch.")
  flags.DEFINE_float("bandwidth", 3.0e12, "Bytes/s of the model (the H100's measured copy rate).")
  flags.DEFINE_float("floor_us", 2.5, "The least time of one kernel in the model, microseconds.")
  flags.DEFINE_integer("groups", 15, "Groups of the memory-bound kernels by JAX source listed.")
  flags.DEFINE_string("out_dir", "", "Also write kernels.tsv and the program (hlo.txt.gz) there.")


# The H100 SXM (80 GB HBM3) as XLA's GpuTargetConfig describes a device (text proto).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "token": 0}
# Instructions that launch nothing: they name, bundle or alias buffers.
_NO_KERNEL = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all"}
_NO_KERNEL |= {"opt-barrier", "partition-id", "replica-id"}
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  opcode: str  # fusion, custom-call, copy, ...
  shape: str  # the result's HLO shape
  result_bytes: int
  operand_bytes: int  # of an operand that the kernel only slices: the slices' bytes
  target: str  # a custom call's target, or a fusion's kind (kLoop, kInput, ...)
  source: str  # the JAX source (op_name) of the kernel

  @property
  def library(self) -> bool:
    """A cuDNN or cuBLAS call or a GEMM fusion: compute-bound, not in the memory model."""
    return self.opcode == "custom-call" or self.name.startswith(("gemm_fusion", "cudnn"))

  @property
  def bytes(self) -> int:
    return self.result_bytes + self.operand_bytes


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape or tuple of shapes, e.g. "(f32[2,3]{1,0}, bf16[4])" -> 32."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
    total += math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 4)
  return total


def _computations(hlo_text: str) -> tuple[dict[str, str], str]:
  """({computation name: body}, the entry computation's name) of an HLO module's text."""
  bodies, entry = {}, None
  for is_entry, name, body in re.findall(
    r"^(ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S
  ):
    bodies[name] = body
    entry = name if is_entry else entry
  return bodies, entry


def _sliced_bytes(body: str) -> dict[int, int]:
  """{parameter index: bytes read} for the parameters of a fused computation used only by slices."""
  read = {}
  for name, index in re.findall(r"%([\w.\-]+) = \S+ parameter\((\d+)\)", body):
    users = re.findall(
      rf"^\s+(?:ROOT )?%[\w.\-]+ = (\S+) ([\w\-]+)\([^\n]*%{re.escape(name)}[,)]", body, re.M
    )
    if users and all(opcode == "slice" for _, opcode in users):
      read[int(index)] = sum(shape_bytes(shape) for shape, _ in users)
  return read


def kernels(hlo_text: str) -> list[Kernel]:
  """The kernels an optimised HLO module launches, in program order (loop bodies once each)."""
  bodies, entry = _computations(hlo_text)
  shapes = {}
  for name, shape in re.findall(r"^\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ", hlo_text, re.M):
    shapes.setdefault(name, shape)
  found = []

  def walk(computation: str):
    for line in bodies[computation].split("\n"):
      match = _INSTRUCTION.match(line)
      if not match or match.group(3) in _NO_KERNEL:
        continue
      name, shape, opcode, operands, rest = match.groups()
      called = re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", rest)
      if opcode in ("while", "call", "conditional"):
        for callee in called:
          walk(callee)
        continue
      sliced = _sliced_bytes(bodies[called[0]]) if opcode == "fusion" and called else {}
      names = re.findall(r"%([\w.\-]+)", operands)
      operand_bytes = sum(
        sliced.get(i, shape_bytes(shapes.get(o, ""))) for i, o in enumerate(names)
      )
      target = re.search(r'custom_call_target="([^"]*)"|kind=(\w+)', rest)
      source = re.search(r'op_name="([^"]*)"', rest)
      found.append(
        Kernel(
          name=name,
          opcode=opcode,
          shape=shape,
          result_bytes=shape_bytes(shape),
          operand_bytes=operand_bytes,
          target=next((g for g in target.groups() if g), "") if target else "",
          source=source.group(1) if source else "",
        )
      )

  walk(entry)
  return found


def modelled_seconds(kernel: Kernel, bandwidth: float, floor: float) -> float:
  return max(kernel.bytes / bandwidth, floor)


def kind(kernel: Kernel) -> str:
  """cuDNN, cuBLAS, GEMM fusion, copy, or fusion (with its kind)."""
  if kernel.opcode == "custom-call":
    return "cuDNN call" if "cudnn" in kernel.target else f"library call {kernel.target}"
  if kernel.library:
    return "GEMM fusion (Triton)"
  if kernel.opcode == "fusion":
    return f"fusion, {kernel.target}"
  return kernel.opcode


def deviceless_mesh(target: str = H100_TARGET):
  """A one-device mesh of the described GPU, for compiling only."""
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1")
  except Exception as e:  # the plugin's own errors name no fix
    raise SystemExit(
      f"benchmarks/gpu_compile.py needs JAX's CUDA plugin in this environment (pip install "
      f'"jax[cuda12]=={jax.__version__}"): {type(e).__name__}: {e}'
    ) from None
  return topologies.make_mesh(topology, (1,), (parallel.DATA_AXIS,))


def compile_train_step(config, batch: int, mesh):
  """The compiled train step of `config` over `mesh`, from abstract arguments."""
  # The speed paths a GPU run would choose ("auto" resolved for "gpu", not for this machine).
  run = dataclasses.replace(run_lib.make_run(run_lib.resolve_auto(config, "gpu")), mesh=mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  image_shape = (batch, *run.image_shape)
  images = jax.ShapeDtypeStruct(
    image_shape, jnp.uint8, sharding=NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  )
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  lowered = step_lib.compile_train_step(run).lower(run.abstract_state(), {"image": images}, key)
  return lowered.compile()


def main(argv):
  del argv
  config = FLAGS.config
  config.train.batch_size = FLAGS.batch
  if condition_kind(config.model) != "none":
    raise SystemExit("benchmarks/gpu_compile.py: unconditional models only (the batch is images)")
  mesh = deviceless_mesh()
  start = time.perf_counter()
  compiled = compile_train_step(config, FLAGS.batch, mesh)
  seconds = time.perf_counter() - start
  found = kernels(compiled.as_text())
  floor = FLAGS.floor_us * 1e-6
  memory_bound = [k for k in found if not k.library]
  model = sum(modelled_seconds(k, FLAGS.bandwidth, floor) for k in memory_bound)
  temp = compiled.memory_analysis().temp_size_in_bytes
  print(
    f"**train step compiled for an NVIDIA H100 (deviceless)**, batch {FLAGS.batch}, model dtype "
    f"{config.model.dtype}, jax {jax.__version__}, compiled in {seconds:.0f} s: {len(found)} "
    f"kernels, {sum(k.bytes for k in memory_bound) / 1e9:.2f} GB read and written by the "
    f"{len(memory_bound)} memory-bound ones, modelled at {timing.num(1e3 * model)} ms "
    f"({FLAGS.bandwidth / 1e12:.1f} TB/s, at least {FLAGS.floor_us} µs each); XLA temporary "
    f"memory {temp / 2**30:.2f} GiB.\n"
  )
  print("| kind of kernel | kernels | GB read and written | modelled ms |")
  print("|---|--:|--:|--:|")
  by_kind = collections.defaultdict(list)
  for k in found:
    by_kind[kind(k)].append(k)
  for name, ks in sorted(by_kind.items(), key=lambda item: -sum(k.bytes for k in item[1])):
    ms = (
      ""
      if ks[0].library
      else timing.num(1e3 * sum(modelled_seconds(k, FLAGS.bandwidth, floor) for k in ks))
    )
    print(f"| {name} | {len(ks)} | {sum(k.bytes for k in ks) / 1e9:.3f} | {ms} |")
  groups = collections.defaultdict(list)
  for k in memory_bound:
    groups[timing.source_group(k.source) if k.source else "no source (copies)"].append(k)
  print(f"\nMemory-bound kernels by JAX source, the {FLAGS.groups} largest:\n")
  print("| pass and layer | kernels | GB | modelled ms |")
  print("|---|--:|--:|--:|")
  ranked = sorted(
    groups.items(),
    key=lambda item: -sum(modelled_seconds(k, FLAGS.bandwidth, floor) for k in item[1]),
  )
  for name, ks in ranked[: FLAGS.groups]:
    ms = 1e3 * sum(modelled_seconds(k, FLAGS.bandwidth, floor) for k in ks)
    print(f"| {name} | {len(ks)} | {sum(k.bytes for k in ks) / 1e9:.3f} | {timing.num(ms)} |")
  if FLAGS.out_dir:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "kernels.tsv"), "w") as f:
      f.write("kernel\tkind\tresult\tresult_bytes\toperand_bytes\tsource\n")
      for k in found:
        f.write(
          f"{k.name}\t{kind(k)}\t{k.shape}\t{k.result_bytes}\t{k.operand_bytes}\t{k.source}\n"
        )
    with gzip.open(os.path.join(FLAGS.out_dir, "hlo.txt.gz"), "wt") as f:
      f.write(compiled.as_text())
  print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")


if __name__ == "__main__":
  define_flags()
  app.run(main)
