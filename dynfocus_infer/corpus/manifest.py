"""Reads and checks a corpus manifest (JSONL or Parquet) before any work: one request per row, unique ids.

Rows hold `id`, `video` (a path; a relative one is taken from the current folder), `question` and optionally
per-row frame sampling (`num_frames`, or `fps` with `max_frames`) and sampling fields (`max_tokens`, `temperature`,
`top_p`, `top_k`, `seed`). Every row is checked here (types, values, unique ids), so a bad manifest stops the job
with one clear error instead of failing later on a worker. A bad *video* is not a manifest problem: it becomes an
error row.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from ..errors import RequestError, is_integer, is_real
from ..outputs import Request
from ..sampling import SamplingParams
from .errors import CorpusError

REQUIRED_FIELDS = ("id", "video", "question")
FRAME_FIELDS = ("num_frames", "fps", "max_frames")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
OPTIONAL_FIELDS = FRAME_FIELDS + SAMPLING_FIELDS
INTEGER_FIELDS = ("num_frames", "max_frames", "max_tokens", "top_k", "seed")


def read_manifest(path: str) -> list[dict]:
    """The manifest's rows as dicts with every field of REQUIRED_FIELDS + OPTIONAL_FIELDS (None where absent).

    `.parquet` files are read as Parquet, anything else as JSONL (one JSON object per non-blank line).
    Raises CorpusError naming the file, the row (line number for JSONL) and what is wrong."""
    if not os.path.isfile(path):
        raise CorpusError(f"manifest {path!r} does not exist or is not a file")
    raw = _read_parquet(path) if path.endswith(".parquet") else _read_jsonl(path)
    rows = [_check_row(path, where, value) for where, value in raw]
    if not rows:
        raise CorpusError(f"manifest {path!r} holds no rows")
    duplicates = [i for i, n in Counter(r["id"] for r in rows).items() if n > 1]
    if duplicates:
        shown = ", ".join(repr(i) for i in duplicates[:5])
        raise CorpusError(f"manifest {path!r}: {len(duplicates)} id(s) appear more than once ({shown}"
                          f"{', ...' if len(duplicates) > 5 else ''}); every row needs its own id, since the output "
                          f"holds exactly one row per id")
    return rows


def sampling_for(row: dict, default: SamplingParams) -> SamplingParams:
    """The job's SamplingParams with the row's own sampling fields in place of the job's."""
    fields = {**vars(default), **{k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None}}
    return SamplingParams(**fields)


def frame_sampling_for(row: dict, default: dict) -> dict:
    """decode_video's num_frames / fps / max_frames for a row: the row's own, else the job's (`default`)."""
    if row.get("num_frames") is not None:
        return dict(num_frames=row["num_frames"], fps=None, max_frames=None)
    if row.get("fps") is not None:
        return dict(num_frames=None, fps=row["fps"], max_frames=row.get("max_frames") or default.get("max_frames"))
    return dict(default)


def _read_jsonl(path: str) -> list[tuple[str, object]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except ValueError as error:
                    raise CorpusError(f"manifest {path!r} line {number}: not JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise CorpusError(f"manifest {path!r} is not UTF-8 text ({error.reason})") from error
    return rows


def _read_parquet(path: str) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for an unreadable file
        raise CorpusError(f"manifest {path!r}: not a readable Parquet file ({error})") from error
    return [(f"row {number}", value) for number, value in enumerate(table.to_pylist())]


def _check_row(path: str, where: str, value: object) -> dict:
    def fail(message: str):
        raise CorpusError(f"manifest {path!r} {where}: {message}")

    if not isinstance(value, dict):
        fail(f"expected a JSON object with {', '.join(REQUIRED_FIELDS)}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        fail(f"unknown field(s) {unknown}; allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
    row = {name: value.get(name) for name in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    if is_integer(row["id"]):
        row["id"] = str(row["id"])
    for name in REQUIRED_FIELDS:
        if not isinstance(row[name], str) or not row[name].strip():
            fail(f"'{name}' must be a non-empty string, got {row[name]!r}")
    # Relative to where the command runs, as for LLM.generate: workers run elsewhere, so they get the full path.
    row["video"] = os.path.abspath(os.path.expanduser(row["video"]))
    for name in OPTIONAL_FIELDS:
        number = row[name]
        if number is None:
            continue
        if not (is_integer(number) or (name not in INTEGER_FIELDS and is_real(number))):
            fail(f"'{name}' must be {'an integer' if name in INTEGER_FIELDS else 'a number'}, got {number!r}")
        row[name] = int(number) if name in INTEGER_FIELDS else float(number)
    if row["num_frames"] is not None and (row["fps"] is not None or row["max_frames"] is not None):
        fail("give num_frames, or fps (with max_frames), not both")
    if row["max_frames"] is not None and row["fps"] is None:
        fail("max_frames only goes with fps")
    if row["num_frames"] is not None and row["num_frames"] < 1:
        fail(f"num_frames = {row['num_frames']}: expected >= 1")
    if row["fps"] is not None and not 0 < row["fps"] < float("inf"):
        fail(f"fps = {row['fps']}: expected a number > 0")
    if row["max_frames"] is not None and row["max_frames"] < 1:
        fail(f"max_frames = {row['max_frames']}: expected >= 1")
    try:
        sampling_for(row, SamplingParams())
        Request(question=row["question"], request_id=row["id"])
    except RequestError as error:
        fail(str(error))
    return row
