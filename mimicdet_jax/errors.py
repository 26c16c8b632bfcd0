"""Expected errors and how every command-line entry point reports them.

A `UserError` is a mistake the user can fix without reading code: a missing
or unreadable file, a bad annotation, an unknown config key or value, a
workdir without a checkpoint, image or category ids that do not match. Its
message names the file, id or key. Every entry point (train.py, eval.py,
predict.py, `python -m mimicdet_jax.demo`, `.tools.import_weights`,
`.experiments.ablate`) runs its main through `cli` (or
`config_lib.run_absl`, which also checks `--config.<key>` overrides), which
prints such an error as one line on stderr and exits with status 1. Any
other exception is a bug and keeps its traceback.

Subclasses also derive from the built-in exception a caller would expect
(ValueError, FileNotFoundError), so library callers can catch either.
"""
import functools
import os
import sys
from typing import Callable, NoReturn, TypeVar

# This module imports nothing of mimicdet_jax: every other module may import it.

F = TypeVar('F', bound=Callable)


class UserError(Exception):
  """A mistake in the user's input; reported as one line, exit status 1."""


class ConfigError(UserError, ValueError):
  """An unknown config key or a value the code cannot use."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the command needs is not there (e.g. a checkpoint)."""


class ArtifactError(UserError, ValueError):
  """An exported detector directory or an input it cannot take
  (serving/detector.py's DetectorError, re-raised by evaluation/exported.py)."""


def one_line(error: BaseException) -> str:
  """The error's message on one line (newlines become '; ')."""
  parts = [p.strip() for p in str(error).splitlines() if p.strip()]
  return '; '.join(parts) or type(error).__name__


def exit_with(error: UserError) -> NoReturn:
  """Prints '<program>: error: <message>' on stderr and exits with status 1."""
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'mimicdet'
  sys.stdout.flush()
  print(f'{prog}: error: {one_line(error)}', file=sys.stderr, flush=True)
  sys.exit(1)


def cli(main: F) -> F:
  """Wraps an entry point's main: a UserError ends the program with one line."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      exit_with(e)

  return wrapped  # type: ignore[return-value]
