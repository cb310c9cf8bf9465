"""Errors of the passes layer (the hierarchy, with exit codes and HTTP statuses, is drawn in
`fusenode.errors`)."""

from fusenode.errors import Error


class PassError(Error, http_status=400):
    """Base of all errors raised by passes/."""


class ModelFileError(PassError):
    """The input model cannot be read or is not a valid ONNX model."""


class OutputError(PassError):
    """The output model cannot be written."""


class VerificationError(PassError, exit_code=3, http_status=422):
    """The optimized model is not proven equivalent to the original."""
