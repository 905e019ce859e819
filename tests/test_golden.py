"""Behaviour pinned by a golden file: 20 training steps of the shapes config and a DDIM sample.

`tests/golden/shapes_20_steps.json` was written by `tests/golden/run_golden.py`; the same scenario
must give the same losses, parameters and images. (First written before the package was
reorganised into layers, with XLA's default pipeline; written again on 2026-12-03 with its cheap
pipeline, which halves the scenario's time: the 20 losses moved by at most 1.5e-7 relative and
the images' mean not at all.) On the machine kind and JAX version that wrote it, the match is
bitwise. Elsewhere float rounding differs (other CPU instructions, another XLA), so the losses and
the images' mean are compared with a tolerance instead; the hashes are then not expected to match.
"""

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "golden", "run_golden.py")
GOLDEN = os.path.join(HERE, "golden", "shapes_20_steps.json")


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("golden")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out = subprocess.run(
    [sys.executable, SCRIPT, str(workdir / "run")], capture_output=True, text=True, env=env
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_golden_run_matches(fingerprint):
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert len(fingerprint["losses"]) == len(golden["losses"]) == 20
  if fingerprint["machine"] == golden["machine"]:
    assert fingerprint == golden
  else:
    for got, want in zip(fingerprint["losses"], golden["losses"], strict=True):
      assert math.isclose(got, want, rel_tol=1e-3), (got, want)
    assert abs(fingerprint["samples_mean"] - golden["samples_mean"]) < 0.5
