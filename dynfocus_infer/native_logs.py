"""Third-party decoder logs off the user's terminal, into the `logging` module (logger "dynfocus_infer.decoders").

decord's bundled FFmpeg logs through av_log, which decord.logging.set_level silences. decord's own C++ messages
("[hh:mm:ss] .../video_reader.cc:83: ERROR opening ...") are written straight to file descriptor 2, beside the
typed error we raise with the same content; no API turns them off. While decord opens a file, fd 2 therefore points
at a temporary file; afterwards, lines that are decoder logs go to the logger at DEBUG and anything else written meanwhile
(a progress bar, a warning from another thread) is passed on to the real stderr. PyAV (>= 13) keeps FFmpeg's logs
off unless asked.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

LOGGER = logging.getLogger("dynfocus_infer.decoders")
_DECODER_LINE = re.compile(rb"^(\[\d\d:\d\d:\d\d\] \S+:\d+: |\[[^\]]+ @ 0x[0-9a-f]+\] )")

_lock = threading.Lock()
_users = 0
_saved_fd = -1
_capture = None


def quiet_decord() -> None:
    """Silences the FFmpeg inside decord (its av_log level)."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)


def _release(captured: bytes, saved_fd: int) -> None:
    passthrough = []
    for line in captured.splitlines(keepends=True):
        if _DECODER_LINE.match(line):
            LOGGER.debug("%s", line.decode("utf-8", "replace").rstrip())
        else:
            passthrough.append(line)
    if passthrough:
        os.write(saved_fd, b"".join(passthrough))


@contextlib.contextmanager
def decoder_stderr_to_logging() -> Iterator[None]:
    """While any thread is inside, fd 2 is captured (see the module doc); the last one out restores it."""
    global _users, _saved_fd, _capture
    with _lock:
        if _users == 0:
            sys.stderr.flush()
            _capture = tempfile.TemporaryFile()
            _saved_fd = os.dup(2)
            os.dup2(_capture.fileno(), 2)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.stderr.flush()
                os.dup2(_saved_fd, 2)
                _capture.seek(0)
                captured = _capture.read()
                _capture.close()
                try:
                    _release(captured, _saved_fd)
                finally:
                    os.close(_saved_fd)
                    _saved_fd, _capture = -1, None
