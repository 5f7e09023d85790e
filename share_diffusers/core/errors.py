"""Exceptions raised by the Share core. Each message names the file, key or layer at fault."""


class ShareError(Exception):
    """Base class of every error this package raises on bad input."""


class LoraFormatError(ShareError, ValueError):
    """A LoRA file or folder could not be read as LoRA factors (bad keys, shapes, values, format)."""


class ShareCheckpointError(ShareError, ValueError):
    """A Share checkpoint on disk is missing, corrupt, or from an unknown/newer format version."""


class StyleError(ShareError, KeyError):
    """A style name is unknown, empty, or already taken."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class FactorValueError(ShareError, ValueError):
    """Factors to be stored hold values that cannot be: NaN or Inf, or an all-zero style core."""


class ShapeMismatchError(ShareError, ValueError):
    """Factors do not fit a layer (wrong shape) or a model (missing layer)."""
