"""Errors that reach users with a one-line message instead of a traceback."""


class ConfigError(ValueError):
  """A bad configuration value; the message is one line naming the field and the fix."""
