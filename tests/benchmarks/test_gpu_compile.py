"""benchmarks/gpu_compile.py: the kernels of a compiled GPU program and the bytes each moves."""

import pytest

from benchmarks import gpu_compile

# The shape of XLA:GPU's optimized HLO: fusions (one kernel each), a cuDNN call, a copy, a
# while loop, and the instructions that launch nothing (parameters, bitcasts, tuples).
_HLO = """\
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%fused_slice (param_0: f32[1000], param_1: f32[10]) -> f32[10] {
  %param_0 = f32[1000]{0} parameter(0)
  %param_1 = f32[10]{0} parameter(1)
  %slice.1 = f32[10]{0} slice(%param_0), slice={[20:30]}
  ROOT %add.2 = f32[10]{0} add(%slice.1, %param_1)
}

%fused_reduce (param_0.1: bf16[8,4,4,16]) -> f32[8,16] {
  %param_0.1 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %convert.1 = f32[8,4,4,16]{3,2,1,0} convert(%param_0.1)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8,16]{1,0} reduce(%convert.1, %constant.1), dimensions={1,2}, to_apply=%add
}

%body (state: (s32[], f32[10])) -> (s32[], f32[10]) {
  %state = (s32[], f32[10]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %v = f32[10]{0} get-tuple-element(%state), index=1
  %loop_add_fusion = f32[10]{0} fusion(%v, %v), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(f)/while/add"}
  ROOT %t = (s32[], f32[10]{0}) tuple(%i, %loop_add_fusion)
}

ENTRY %main (p0: f32[1000], p1: f32[10], p2: bf16[8,4,4,16], p3: bf16[16,3,3,16]) -> f32[8,16] {
  %p0 = f32[1000]{0} parameter(0)
  %p1 = f32[10]{0} parameter(1)
  %p2 = bf16[8,4,4,16]{3,2,1,0} parameter(2)
  %p3 = bf16[16,3,3,16]{3,2,1,0} parameter(3)
  %loop_add_fusion.1 = f32[10]{0} fusion(%p0, %p1), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(f)/add"}
  %input_reduce_fusion = f32[8,16]{1,0} fusion(%p2), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(f)/transpose(jvp(UNet))/down_0_block_0/norm1/reduce_sum"}
  %cudnn-conv = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%p2, %p3), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward"
  %copy.1 = f32[10]{0} copy(%p1)
  %bitcast.1 = f32[10]{0} bitcast(%copy.1)
  %init = (s32[], f32[10]{0}) tuple(%p0, %bitcast.1)
  %while.1 = (s32[], f32[10]{0}) while(%init), condition=%body, body=%body
  ROOT %out = f32[8,16]{1,0} bitcast(%input_reduce_fusion)
}
"""  # noqa: E501 (HLO writes one instruction per line)


def test_shape_bytes_of_arrays_and_tuples():
  assert gpu_compile.shape_bytes("f32[2,3]{1,0}") == 24
  assert gpu_compile.shape_bytes("(bf16[4]{0}, pred[3], s32[])") == 8 + 3 + 4
  assert gpu_compile.shape_bytes("u8[0]{0}") == 0


def test_kernels_are_the_launched_instructions_with_their_bytes():
  found = {k.name: k for k in gpu_compile.kernels(_HLO)}
  # Parameters, bitcasts and tuples launch nothing; the loop body's fusion counts once.
  assert list(found) == [
    "loop_add_fusion.1",
    "input_reduce_fusion",
    "cudnn-conv",
    "copy.1",
    "loop_add_fusion",
  ]
  # A fused parameter read only through a slice costs the slice: 10 of its 1000 floats.
  add = found["loop_add_fusion.1"]
  assert (add.result_bytes, add.operand_bytes) == (40, 40 + 40)
  assert (add.target, add.source) == ("kLoop", "jit(f)/add")
  reduce = found["input_reduce_fusion"]
  assert (reduce.result_bytes, reduce.operand_bytes) == (8 * 16 * 4, 8 * 4 * 4 * 16 * 2)
  conv = found["cudnn-conv"]
  assert conv.library and conv.target == "__cudnn$convForward"
  assert conv.operand_bytes == 2 * (8 * 4 * 4 * 16 + 16 * 3 * 3 * 16)
  assert not any(k.library for name, k in found.items() if name != "cudnn-conv")
  assert gpu_compile.kind(conv) == "cuDNN call"
  assert gpu_compile.kind(reduce) == "fusion, kInput"
  assert gpu_compile.kind(found["copy.1"]) == "copy"


def test_the_model_charges_bytes_at_the_bandwidth_and_at_least_the_floor():
  found = {k.name: k for k in gpu_compile.kernels(_HLO)}
  reduce = found["input_reduce_fusion"]
  assert gpu_compile.modelled_seconds(reduce, 1e3, 0.0) == pytest.approx(reduce.bytes / 1e3)
  assert gpu_compile.modelled_seconds(reduce, 1e12, 2.5e-6) == 2.5e-6
