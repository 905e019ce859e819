"""benchmarks/profile_step.py: how the operations of XLA's compiled program are told apart."""

import collections

from benchmarks import profile_step, timing

# The shape of XLA:CPU's optimized HLO: library fusions (`__ynn_fusion`) hold a convolution, a
# matrix product, or only a reduction.
_HLO = """\
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%fused_computation.1 (param_0: f32[32,8,8,16]) -> f32[32,16] {
  %param_0 = f32[32,8,8,16]{3,2,1,0} parameter(0)
  %constant = f32[] constant(0)
  ROOT %reduce.1 = f32[32,16]{1,0} reduce(%param_0, %constant), dimensions={1,2}, to_apply=%add
}

%fused_computation.2 (param_0.1: f32[32,8,8,16], param_1.1: f32[3,3,16,16]) -> f32[32,8,8,16] {
  %param_0.1 = f32[32,8,8,16]{3,2,1,0} parameter(0)
  %param_1.1 = f32[3,3,16,16]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[32,8,8,16]{3,2,1,0} convolution(%param_0.1, %param_1.1), window={size=3x3 pad=1_1x1_1}
}

%fused_computation.3 (param_0.2: f32[2048,16], param_1.2: f32[16,32]) -> f32[2048,32] {
  %param_0.2 = f32[2048,16]{1,0} parameter(0)
  %param_1.2 = f32[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[2048,32]{1,0} dot(%param_0.2, %param_1.2), lhs_contracting_dims={1}
}

ENTRY %main (p0: f32[32,8,8,16], p1: f32[3,3,16,16], p2: f32[16,32]) -> f32[32,16] {
  %p0 = f32[32,8,8,16]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,16,16]{3,2,1,0} parameter(1)
  %p2 = f32[16,32]{1,0} parameter(2)
  %ynn_fusion.1 = f32[32,16]{1,0} fusion(%p0), calls=%fused_computation.1, metadata={op_name="jit(f)/UNet/norm/reduce_sum"}
  %ynn_fusion.2 = f32[32,8,8,16]{3,2,1,0} fusion(%p0, %p1), calls=%fused_computation.2, metadata={op_name="jit(f)/transpose(jvp(UNet))/conv1/conv_general_dilated"}
  %bitcast.1 = f32[2048,16]{1,0} bitcast(%p0)
  %ynn_fusion.3 = f32[2048,32]{1,0} fusion(%bitcast.1, %p2), calls=%fused_computation.3, metadata={op_name="jit(f)/UNet/nin_shortcut/dot_general"}
  ROOT %copy.1 = f32[32,16]{0,1} copy(%ynn_fusion.1)
}
"""  # noqa: E501 (HLO writes one instruction per line)


def test_library_fusions_are_told_apart_by_what_they_hold():
  operations = profile_step.hlo_operations(_HLO)
  kinds = {name: profile_step.category(name, *operations[name]) for name in operations}
  assert operations["ynn_fusion.1"] == ("f32[32,16]", "jit(f)/UNet/norm/reduce_sum", "", False)
  assert kinds["ynn_fusion.1"].startswith("elementwise and reductions")
  assert kinds["ynn_fusion.2"] == "convolution, input gradient"
  assert kinds["ynn_fusion.3"].startswith("matrix products")
  assert kinds["copy.1"] == "layout copies and transposes"


def test_operations_without_hlo_keep_their_old_kinds():
  # A name the HLO lacks (the profile's own events) is judged by its name and shape alone.
  assert profile_step.category("ynn_fusion.9", "f32[128,3,3,128]", "").startswith("convolution, w")
  assert profile_step.category("ynn_fusion.9", "f32[64,64]", "", computes=False).startswith("elem")
  # XLA:CPU's own convolutions keep JAX's name.
  source = "jit(f)/jvp(UNet)/conv_out/conv_general_dilated"
  assert profile_step.category("conv_general_dilated.4", "f32[8,16,16,3]", source).endswith(
    "forward"
  )


def test_sources_are_grouped_by_pass_and_layer():
  group = timing.source_group
  assert group("jit(step)/transpose(jvp(UNet))/up_0_block_0/norm1/mul") == "backward norm"
  assert group("jit(step)/jvp(UNet)/down_1_block_1/random_bits") == "forward block"
  assert group("jit(f)/UNet/mid_block_1/attn/q/dot_general") == "forward q"
  assert group("jit(step)/transpose(jvp(UNet))/up_1_upsample/conv/reduce_sum") == "backward conv"
  assert group("jit(train_step)/mul") == "update other"


def test_every_operation_and_the_program_are_written(tmp_path):
  import gzip

  operations = profile_step.hlo_operations(_HLO)
  durations = collections.Counter({"ynn_fusion.2": 3000, "copy.1": 500, "ynn_fusion.1": 1500})
  profile_step.write_operations(str(tmp_path), durations, operations, _HLO)
  rows = (tmp_path / "ops.tsv").read_text().splitlines()
  assert rows[0].split("\t")[:3] == ["operation", "us", "kind"]
  assert [r.split("\t")[:2] for r in rows[1:]] == [
    ["ynn_fusion.2", "3.0"],
    ["ynn_fusion.1", "1.5"],
    ["copy.1", "0.5"],
  ]
  assert rows[1].split("\t")[2] == "convolution, input gradient"
  with gzip.open(tmp_path / "hlo.txt.gz", "rt") as f:
    assert f.read() == _HLO


# XLA:GPU's optimized HLO: a reduction fusion, a cuDNN call and a copy.
_GPU_HLO = """\
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%fused_reduce (param_0: bf16[8,4,4,16]) -> f32[8,16] {
  %param_0 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %convert.1 = f32[8,4,4,16]{3,2,1,0} convert(%param_0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8,16]{1,0} reduce(%convert.1, %constant.1), dimensions={1,2}, to_apply=%add
}

ENTRY %main (p0: bf16[8,4,4,16], p1: bf16[16,3,3,16], p2: f32[10]) -> f32[8,16] {
  %p0 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %p1 = bf16[16,3,3,16]{3,2,1,0} parameter(1)
  %p2 = f32[10]{0} parameter(2)
  %input_reduce_fusion = f32[8,16]{1,0} fusion(%p0), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(f)/UNet/norm/reduce_sum"}
  %cudnn-conv = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward"
  %copy.1 = f32[10]{0} copy(%p2)
  ROOT %out = f32[8,16]{1,0} bitcast(%input_reduce_fusion)
}
"""  # noqa: E501 (HLO writes one instruction per line)


def test_memory_bound_operations_against_the_copy_rate(tmp_path):
  durations_ns = collections.Counter(
    {"input_reduce_fusion": 10_000, "cudnn-conv": 50_000, "copy.1": 1_000, "not.in.hlo": 3_000}
  )
  operations = profile_step.hlo_operations(_GPU_HLO)
  profile_step.write_operations(str(tmp_path), durations_ns, operations, _GPU_HLO)
  durations_us, hlo_text = profile_step.read_operations(str(tmp_path))
  assert hlo_text == _GPU_HLO
  assert durations_us == {
    "cudnn-conv": 50.0,
    "input_reduce_fusion": 10.0,
    "not.in.hlo": 3.0,
    "copy.1": 1.0,
  }
  # At 1 GB/s a byte takes 1 ns. The cuDNN call is compute-bound and left out, as is an operation
  # the program does not hold.
  slow = profile_step.below_copy_rate(durations_us, hlo_text, bandwidth=1e9)
  assert [op.name for op in slow] == ["input_reduce_fusion", "copy.1"]
  reduce, copy = slow
  assert reduce.bytes == 8 * 4 * 4 * 16 * 2 + 8 * 16 * 4  # bf16 in, float32 out
  assert abs(reduce.excess_us - (10.0 - reduce.bytes / 1e3)) < 1e-9
  assert (copy.bytes, round(copy.excess_us, 6)) == (80, 0.92)
  assert reduce.source == "jit(f)/UNet/norm/reduce_sum"
