"""The package's layers and their import rules (DESIGN.md section 1), checked by parsing imports.

core       pure math: imports only the standard library, jax, numpy, chex and flax.struct
core, sampling, models, pretrained   nothing from data, runtime or experiment; never optax,
           orbax, tensorflow_datasets, grain or ml_collections
data       no models
experiment imported only by itself (main.py, tests and benchmarks are outside the package)
every module under MAX_LINES lines
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusion_jax"
MAX_LINES = 450
LAYERS = (
  "core",
  "sampling",
  "models",
  "pretrained",
  "text",
  "data",
  "evaluation",
  "runtime",
  "experiment",
)
PURE = ("core", "sampling", "models", "pretrained")
HEAVY = ("optax", "orbax", "tensorflow_datasets", "grain", "ml_collections")
CORE_ALLOWED = ("jax", "numpy", "chex")


def _imports(tree: ast.AST):
  """(dotted module, line) of every import in the module, including those inside functions.

  `from a.b import c` counts as importing a.b.c: c may be a submodule (`from flax import struct`,
  `from diffusion_jax import models`).
  """
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from ((alias.name, node.lineno) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield from ((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "diffusion_jax" and len(parts) > 1 else None


def _broken_rule(home: str | None, module: str) -> str | None:
  """What is wrong with a module of layer `home` importing `module`, or None."""
  top, target = module.split(".")[0], _layer(module)
  if target == "experiment" and home != "experiment":
    return f"{home or 'the package root'} imports experiment ({module})"
  if home in PURE and (target in ("data", "runtime", "experiment") or top in HEAVY):
    return f"{home} imports {module}"
  if home == "data" and target == "models":
    return f"data imports {module}"
  if home == "core" and top == "diffusion_jax" and target != "core":
    return f"core imports {module}"
  if home == "core" and top != "diffusion_jax":
    allowed = top in sys.stdlib_module_names or top in CORE_ALLOWED
    if not (allowed or module.startswith("flax.struct")):
      return f"core imports {module}"
  return None


def layout_violations(package: pathlib.Path) -> list[str]:
  """One line per broken rule: 'path:line: what'."""
  problems = []
  for path in sorted(package.rglob("*.py")):
    rel = path.relative_to(package)
    source = path.read_text()
    if source.count("\n") > MAX_LINES:
      problems.append(f"{rel}: {source.count(chr(10))} lines, over {MAX_LINES}")
    home = rel.parts[0] if len(rel.parts) > 1 else None
    for module, line in _imports(ast.parse(source)):
      problem = _broken_rule(home, module)
      if problem:
        problems.append(f"{rel}:{line}: {problem}")
  return problems


def test_the_package_keeps_its_layers():
  assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= set(
    LAYERS
  )
  assert layout_violations(PACKAGE) == []


BROKEN = {
  "core/bad.py": "from diffusion_jax.runtime import errors\n",
  "core/uses_flax_linen.py": "import flax.linen as nn\n",
  "sampling/bad.py": "import optax\n",
  "models/bad.py": "def f():\n  from diffusion_jax.data import pipeline\n",
  "data/bad.py": "from diffusion_jax import models\n",
  "pretrained/bad.py": "import orbax.checkpoint\n",
  "runtime/bad.py": "from diffusion_jax.experiment import train\n",
  "__init__.py": "from diffusion_jax import experiment\n",
  "evaluation/long.py": "x = 1\n" * (MAX_LINES + 1),
}


@pytest.mark.parametrize("path", sorted(BROKEN))
def test_each_rule_catches_a_wrong_import(tmp_path, path):
  package = tmp_path / "diffusion_jax"
  for layer in LAYERS:
    (package / layer).mkdir(parents=True)
    (package / layer / "fine.py").write_text(
      "import jax\nfrom diffusion_jax.core import schedules\n"
    )
  assert layout_violations(package) == []
  (package / path).write_text(BROKEN[path])
  problems = layout_violations(package)
  assert len(problems) == 1 and problems[0].startswith(path), problems


# DESIGN.md section 3: the names code outside the project imports from the package root.
PUBLIC = (
  "Schedule",
  "make_schedule",
  "q_sample",
  "q_posterior_mean_variance",
  "predict_x0_from_eps",
  "sample",
  "make_model",
)


def test_the_public_api_is_importable_from_the_package_root():
  import diffusion_jax as dj

  assert set(PUBLIC) <= set(dj.__all__)
  for name in dj.__all__:
    assert getattr(dj, name) is not None, name
  code = (
    "import sys, diffusion_jax as dj; from diffusion_jax import " + ", ".join(PUBLIC) + "; "
    "bad = [m for m in sys.modules if m.startswith('diffusion_jax.experiment') or m.split('.')[0] "
    f"in {HEAVY!r}]; assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
