"""One exception family for everything the course's helpers refuse.

Every message names the input (file, line, field or value) and says what to do about it, so a learner
never has to read a traceback from deep inside a library.
"""

from __future__ import annotations


class GPTHelpersError(Exception):
    """Base class: a problem the user can fix, explained in the message."""


class DataError(GPTHelpersError, ValueError):
    """A data file or dataset cannot be used as given."""


class ConfigError(GPTHelpersError, ValueError):
    """A training or command-line setting has an invalid value."""


class ModelLoadError(GPTHelpersError, OSError):
    """A model or tokenizer cannot be loaded (missing folder, unreachable hub, unsafe files)."""


class CheckpointError(GPTHelpersError, OSError):
    """A checkpoint is missing, incomplete or unsafe to load."""


class TrainingError(GPTHelpersError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""
