"""The one exception type for mistakes a user can fix."""


class UsageError(ValueError):
  """Bad input: the message names the field, file or value and says what to do.

  `python -m flmjax.main` prints the message without a traceback and exits with status 2.
  """
