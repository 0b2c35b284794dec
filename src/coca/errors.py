"""The error types for bad input from the person running coca: a wrong argument, a missing or
malformed file, an invalid config value, a full disk, a diverged run. ``UserError`` is the base;
four kinds subclass it: ``InputNotFound``, ``NotADirectory``, ``DiskFull`` and
``TrainingDiverged`` (and other modules derive their own: ``coca.config.ConfigError``,
``coca.prepare.engine.WorkerDied``). The ``coca`` command prints the message of any of them and exits with
status 2; any other exception is a bug and shows its traceback.

Each also subclasses the built-in type a Python caller would expect (``ValueError`` for all;
``FileNotFoundError``, ``NotADirectoryError``, ``OSError``, ``FloatingPointError``), so
``except ValueError`` (or ``except FileNotFoundError`` ...) still catches them.
"""


class UserError(ValueError):
    """Bad input; the message names the file, key or value and what is expected."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class NotADirectory(UserError, NotADirectoryError):
    """A path the user named should be a directory."""


class DiskFull(UserError, OSError):
    """No space left on the device (or over quota) while writing the named file."""


class TrainingDiverged(UserError, FloatingPointError):
    """Too many non-finite losses in a row: the settings (learning rate) or the data need a change."""
