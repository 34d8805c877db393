"""Typed errors: each says what was wrong and what to do about it; and the type checks that raise them."""
import numbers


class DynFocusError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DynFocusError, ValueError):
    """A configuration field is outside its allowed range."""


class CheckpointError(DynFocusError):
    """A checkpoint file is missing, corrupt, or does not match the model (names the file and keys)."""


class VideoDecodeError(DynFocusError):
    """A video could not be read or holds no frames."""


class NonFiniteError(DynFocusError, ValueError):
    """Input data (a video's frame features, points to cluster) holds NaN or inf, which would give meaningless
    distances; the request that carries it fails, the others go on."""


class RequestError(DynFocusError, ValueError):
    """A request is malformed (empty question, prompt over the context, bad sampling parameters)."""


class OutputError(DynFocusError):
    """The results cannot go to the output asked for (locked by another run, not a results file, not writable)."""


def is_integer(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
