"""Exception types users can catch; every message names the file, key or option at fault."""


class VipoError(Exception):
    """Base class of all vipo_jax errors."""


class CheckpointError(VipoError, ValueError):
    """A checkpoint is missing, truncated, or does not match the model it is loaded into."""


class ConfigError(VipoError, ValueError):
    """A configuration value is invalid or inconsistent."""


class DataError(VipoError, ValueError):
    """Input data (prompt files, images) is missing, empty or malformed."""


class WorkdirError(VipoError):
    """A run's ``--workdir`` cannot be used: it is a file, read-only or full, or it holds a run trained
    with another config."""
