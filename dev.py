"""Set-up and the two everyday commands, needing only Python 3.11+ to start.

  python3 dev.py quickstart   # trains the shapes model on this machine, writes sample grids
  python3 dev.py test         # lint + the whole test suite

Each command first makes .venv (a virtual environment in this directory) and installs
requirements.txt into it, once; later runs reuse it. `test` also installs requirements-prepare.txt
(TensorFlow, for the test of the one-time tfds preparation). Extra arguments go to main.py or
pytest.
"""

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
PREPARE_REQUIREMENTS = os.path.join(ROOT, "requirements-prepare.txt")


def venv_python() -> str:
  sub = ("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")
  return os.path.join(VENV, *sub)


def _install(python: str, requirements: str, what: str) -> None:
  """Installs a requirements file into .venv unless it is unchanged since its last install."""
  with open(requirements, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  stamp = os.path.join(VENV, f".{os.path.basename(requirements)}.sha256")
  if not os.path.exists(stamp) or open(stamp).read().strip() != digest:
    print(f"installing {os.path.basename(requirements)} into .venv (once; {what})", flush=True)
    subprocess.run(
      [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", requirements],
      check=True,
    )
    with open(stamp, "w") as f:
      f.write(digest)


def ensure_venv(prepare: bool = False) -> str:
  """Creates .venv and installs the requirements files that changed since their last install."""
  if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older python3
    sys.exit(f"error: Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
  python = venv_python()
  if not os.path.exists(python):
    print(f"creating the virtual environment {VENV}", flush=True)
    venv.create(VENV, with_pip=True)
  _install(python, REQUIREMENTS, "about 700 MB")
  if prepare:
    _install(python, PREPARE_REQUIREMENTS, "TensorFlow, about 1.4 GB")
  return python


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in ("quickstart", "test"):
    print(__doc__.strip())
    return 2
  command, extra = argv[0], argv[1:]
  python = ensure_venv(prepare=command == "test")
  os.chdir(ROOT)
  if command == "quickstart":
    return subprocess.call([python, "main.py", "--config=shapes", *extra])
  for lint in (["check", "."], ["format", "--check", "."]):
    code = subprocess.call([python, "-m", "ruff", *lint])
    if code:
      print("ruff found problems: run `.venv/bin/python -m ruff format .` and fix the rest")
      return code
  # Two workers: most of the suite's time is XLA compiling, which is largely single-threaded.
  # Work stealing hands each worker a contiguous share of the tests (a module's fixtures are set
  # up once) and rebalances at the end.
  return subprocess.call([python, "-m", "pytest", "-q", "-n", "2", "--dist", "worksteal", *extra])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
