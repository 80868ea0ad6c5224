"""The one error type conversion raises for bad input."""

from jaxsink.config import JaxsinkError


class ConvertError(JaxsinkError):
    """A source model cannot be converted: unsupported, incomplete, unsafe or inconsistent.

    The message names the offending file, key or tensor.
    """
