"""Exceptions raised by the Share core. Each message names the file, key or layer at fault, in one line.

Every error that bad input (a file, a name, a number, a call at the wrong time) can cause is a
:class:`ShareError`, so the CLI and the app catch one class and print one line. Each subclass also
derives from the built-in exception the same mistake would raise elsewhere (``ValueError``,
``KeyError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""


class ShareError(Exception):
    """Base class of every error this package raises on bad input."""


class ShareValueError(ShareError, ValueError):
    """An argument has a value or type that cannot be used (a rank, a storage dtype, a batch size...)."""


class LoraFormatError(ShareValueError):
    """A LoRA file or folder could not be read as LoRA factors (bad keys, shapes, values, format)."""


class ShareCheckpointError(ShareValueError):
    """A Share checkpoint on disk is missing, corrupt, unsafe, or from an unknown/newer format version."""


CheckpointError = ShareCheckpointError  # the short name


class StyleError(ShareError, KeyError):
    """A style name is unknown, empty, unaddressable, or already taken; or a style request is malformed."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class FactorValueError(ShareValueError):
    """Factors hold values that cannot be stored or used: NaN or Inf, beyond float32, or an all-zero update."""


class ShapeMismatchError(ShareValueError):
    """Factors do not fit a layer (wrong shape) or a model (missing layer)."""


class ShareStateError(ShareError, RuntimeError):
    """The call is not possible in the current state: a style is fused, PEFT adapters are loaded, factors are held."""


class QuantizedBaseError(ShareStateError):
    """The operation would write into a quantized base weight (fusing a style): refused, the weight is unchanged."""


class ShareIOError(ShareError, OSError):
    """A checkpoint or LoRA file could not be written or read at the operating-system level (permissions, disk full)."""
