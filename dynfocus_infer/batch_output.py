"""The batch command's results file: one JSON line per request, written as each request finishes.

- Lines go out in request order; a result that finishes before an earlier one waits in memory (at most a batch).
  On an interrupt, every finished result is written (`write_held`), so the order of the last lines may differ.
- Each line is written whole (one os.write loop, inside the InterruptGuard's critical block) and is in the file at
  once, so an interrupt or a crash loses only unfinished requests, and the file holds whole lines only.
- One writer per file: an exclusive fcntl lock on the file itself (held while the run lives, released by the OS when
  it dies), so a second run on the same output, by any path or symlink to it, is refused before loading a model.
- The file is opened in place, never replaced: a new file gets the umask's mode, an existing one keeps its mode, and
  a symlink writes through to its target. Without `resume` the old content is cleared at the first result (an
  interrupt before it leaves the old file as it was); with `resume` new lines are appended and the ids already in
  the file are reported in `done_ids`. "-" writes to standard output (no lock, no resume).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from typing import Optional

from .errors import OutputError
from .interrupts import InterruptGuard

STDOUT = "-"


def _read_done_ids(path: str) -> tuple[set, int]:
    """Request ids of the whole result lines in `path`, and the byte length of those lines (a partial last line,
    left by a killed run, is cut off before appending)."""
    with open(path, "rb") as handle:
        data = handle.read()
    whole = data[:data.rfind(b"\n") + 1]
    done = set()
    for number, line in enumerate(whole.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add(str(record["request_id"]))
        except (ValueError, KeyError, TypeError) as error:
            raise OutputError(f"--resume: line {number} of {path!r} is not a dynfocus-infer result line ({error}); "
                              f"refusing to append to a file that is not this command's output") from error
    return done, len(whole)


class ResultWriter:
    """Writes result records to `path` (see the module doc). Results are put by slot (0, 1, ...) and written in
    slot order."""

    def __init__(self, path: str, *, resume: bool = False, guard: Optional[InterruptGuard] = None):
        self.path, self.resume = path, resume
        self._guard = guard
        self._held: dict = {}
        self._next_slot = 0
        self.num_written = self.num_failed = 0
        self.done_ids: set = set()
        self._cleared = resume
        self._closed = False
        if path == STDOUT:
            if resume:
                raise OutputError("--resume needs an output file; '-' (standard output) has no earlier results")
            self._fd = None
            return
        existed = os.path.exists(path)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)  # mode: umask, or the file's own
        except OSError as error:
            raise OutputError(f"--output {path!r}: cannot open it for writing ({error.strerror})") from error
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise OutputError(f"--output {path!r} is being written by another dynfocus-infer run (it holds the "
                              f"file's lock): wait for that run to finish, or choose another output") from None
        self._created = not existed
        self._real_path = os.path.realpath(path)  # a symlink's target: what an unfinished run created
        if resume:
            self.done_ids, length = _read_done_ids(path)
            os.ftruncate(self._fd, length)
            os.lseek(self._fd, length, os.SEEK_SET)

    def _context(self):
        return self._guard.critical() if self._guard is not None else contextlib.nullcontext()

    def _write_line(self, record: dict) -> None:
        if self._closed:
            raise ValueError(f"the results file {self.path!r} is closed")
        data = (json.dumps(record) + "\n").encode("utf-8")
        with self._context():
            if self._fd is None:
                sys.stdout.write(data.decode("utf-8"))
                sys.stdout.flush()
            else:
                if not self._cleared:
                    os.ftruncate(self._fd, 0)
                    os.lseek(self._fd, 0, os.SEEK_SET)
                    self._cleared = True
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            self.num_written += 1
            self.num_failed += record.get("error") is not None

    def put(self, slot: int, record: dict) -> None:
        """Records slot's result; writes it and every held result that now follows in order."""
        if slot < self._next_slot or slot in self._held:
            raise ValueError(f"result slot {slot} was given twice")
        self._held[slot] = record
        while self._next_slot in self._held:
            self._write_line(self._held.pop(self._next_slot))
            self._next_slot += 1

    def write_held(self) -> None:
        """Writes every finished result still waiting for an earlier one (after an interrupt), in slot order."""
        for slot in sorted(self._held):
            self._write_line(self._held.pop(slot))

    def close(self, complete: bool) -> None:
        """Ends the file: a complete run that wrote nothing still clears old content; the lock is released.
        A file this run created and never wrote is removed when the run did not complete."""
        if self._fd is None:
            self._closed = True
            return
        if complete and not self._cleared:
            os.ftruncate(self._fd, 0)
            self._cleared = True
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        if not complete and self._created and self.num_written == 0:
            with contextlib.suppress(OSError):
                os.unlink(self._real_path)
        os.close(self._fd)
        self._fd = None
        self._closed = True
