"""Errors that reach users with a one-line message instead of a traceback."""


class ConfigError(ValueError):
  """A bad configuration value; the message is one line naming the field and the fix."""


class TrainingStopped(Exception):
  """Training stopped on a signal after saving a checkpoint; the same command resumes it.

  Attributes:
    signal_name: "SIGTERM" or "SIGINT".
    step: the step of the checkpoint just saved.
  """

  def __init__(self, signal_name: str, step: int):
    super().__init__(
      f"stopped by {signal_name} at step {step}; checkpoint saved; run the same command to resume"
    )
    self.signal_name = signal_name
    self.step = step


class SamplingStopped(Exception):
  """Sampling stopped on a signal before it finished; no samples were written.

  Attributes:
    signal_name: "SIGTERM" or "SIGINT".
  """

  def __init__(self, signal_name: str):
    super().__init__(f"stopped by {signal_name} while sampling; no samples written")
    self.signal_name = signal_name
