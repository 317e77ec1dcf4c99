"""Exceptions the command line turns into messages instead of tracebacks."""


class UsageError(ValueError):
  """Bad input: the message names the field, file or value and says what to do.

  `python -m flmjax.main` prints the message without a traceback and exits with status 2.
  """


class Stopped(Exception):
  """A run stopped on request (SIGTERM) after saving a checkpoint; rerunning resumes it.

  It ends the command (and a pipeline's later stages); `python -m flmjax.main` exits with
  STOPPED_STATUS, 128 + SIGTERM as for a process the signal ended, so that a scheduler or
  a `&&` chain sees an unfinished run.
  """


STOPPED_STATUS = 143
