"""The one error type for bad input from the person running coca: a wrong argument, a missing or
malformed file, an invalid config value. The ``coca`` command prints its message and exits with
status 2; any other exception is a bug and shows its traceback.

They subclass the built-in types a Python caller would expect (``ValueError``,
``FileNotFoundError``, ``NotADirectoryError``), so ``except ValueError`` still catches them.
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
