"""Exceptions a user can cause. The CLI prints them as one line and exits with status 2."""


class PyroVAEError(ValueError):
    """Base class for every error caused by user input (config, data, run folder)."""


class ConfigError(PyroVAEError):
    """An invalid, unknown or incompatible configuration value."""


class DataError(PyroVAEError):
    """A dataset that is missing, malformed or incompatible with the model."""


class CheckpointError(PyroVAEError):
    """A run folder or checkpoint that cannot be used as asked."""


class TrainingError(PyroVAEError):
    """Training stopped because it cannot make progress (e.g. repeated non-finite losses)."""


class OutputError(PyroVAEError):
    """A file or folder the package must write cannot be written: a full disk (ENOSPC), a
    read-only file system (EROFS), no permission (EACCES), a vanished folder (ENOENT). The
    message names the path and the error; nothing is left half-written."""


class ResourceError(PyroVAEError):
    """A computation would need more memory than the machine has (the estimate is made from the
    sizes before anything is allocated; ``--memory-limit`` overrides the limit)."""
