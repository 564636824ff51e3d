"""The trainer's user errors: mistakes a user can fix (a config, a file, a folder), not bugs.

``lora-one-train`` prints a ``UserError`` as one line on stderr and exits with code 2 (``--debug`` shows the
traceback); every other exception is a bug and keeps its traceback. Each subclass also derives from the
builtin a caller would catch without knowing the trainer (``ValueError`` for bad values, ``RuntimeError`` for
a state on disk).

Example:
    >>> issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    True
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do.

    Example:
        >>> str(UserError("output_dir 'runs/x' is read-only; pass --output-dir"))
        "output_dir 'runs/x' is read-only; pass --output-dir"
    """


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names it and what is allowed.

    Example:
        >>> isinstance(ConfigError("seed must be >= 0, got -1"), ValueError)
        True
    """


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used (unreadable, of another configuration or other data); says which and why.

    Example:
        >>> isinstance(CheckpointError("checkpoint 4 is truncated"), RuntimeError)
        True
    """


class LockError(UserError, RuntimeError):
    """Another live run holds the output folder; the message names its pid, host and start time.

    Example:
        >>> isinstance(LockError("runs/x is in use by pid 12"), UserError)
        True
    """


class DataError(UserError, ValueError):
    """The task's data cannot be used as given (missing, malformed, or changed since the checkpoint).

    Example:
        >>> isinstance(DataError("train.jsonl changed since checkpoint 4"), ValueError)
        True
    """


class DivergedError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss or state; the message names the first bad step and the way out.

    Example:
        >>> isinstance(DivergedError("the loss became nan at step 5"), FloatingPointError)
        True
    """
