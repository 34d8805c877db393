"""Typed errors: each says what was wrong and what to do about it."""


class DynFocusError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DynFocusError, ValueError):
    """A configuration field is outside its allowed range."""


class CheckpointError(DynFocusError):
    """A checkpoint file is missing, corrupt, or does not match the model (names the file and keys)."""


class VideoDecodeError(DynFocusError):
    """A video could not be read or holds no frames."""


class RequestError(DynFocusError, ValueError):
    """A request is malformed (empty question, prompt over the context, bad sampling parameters)."""
