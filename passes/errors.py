"""Errors of the passes layer; ``str(err)`` is a one-line message for the user.

PassError
├── ModelFileError      the file is missing, unreadable, not ONNX, truncated or invalid
├── OutputError         the output cannot be written (path, permissions, same as input)
└── VerificationError   the optimized model's outputs differ from the original's,
                        or the check itself could not run
"""


class PassError(Exception):
    """Base of all errors raised by passes/."""


class ModelFileError(PassError):
    """The input model cannot be read or is not a valid ONNX model."""


class OutputError(PassError):
    """The output model cannot be written."""


class VerificationError(PassError):
    """The optimized model is not proven equivalent to the original."""
