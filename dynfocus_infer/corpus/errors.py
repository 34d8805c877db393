"""The corpus job's own error: a manifest, output folder or job setting that cannot work, found before any work."""
from ..errors import DynFocusError


class CorpusError(DynFocusError):
    """A corpus job cannot start or finish as asked (names the file, field or setting and what to do)."""
