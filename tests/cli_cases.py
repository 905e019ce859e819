"""Runs main.py's command line on many argument lists, each in a child forked from this one
process, which imports the CLI's modules once (about 3 s) instead of once per case.

  python tests/cli_cases.py < cases.json > results.json

cases.json: [{"argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH}, ...]; each child
takes its environment additions, writes its output to the two files and exits with main.py's
status. This process never starts a JAX backend, so each child starts its own, with its own
XLA_FLAGS, as a fresh `python main.py` would. results.json: the exit statuses, in order.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

from diffusion_jax.experiment import cli  # noqa: E402


def child(case: dict) -> int:
  os.environ.update(case["env"])
  for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  # ml_collections reads --config.a.b overrides from sys.argv itself.
  sys.argv = [os.path.join(ROOT, "main.py"), *case["argv"]]
  try:
    cli.run(sys.argv)
    return 0
  except SystemExit as exit_:
    code = exit_.code
    if code is None or isinstance(code, int):
      return code or 0
    print(code, file=sys.stderr)
    return 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def main() -> None:
  cases = json.load(sys.stdin)
  pids = []
  for case in cases:
    pid = os.fork()
    if pid == 0:
      os._exit(child(case))
    pids.append(pid)
  json.dump([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids], sys.stdout)


if __name__ == "__main__":
  main()
