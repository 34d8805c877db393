"""The output folder: one row per id in shards written atomically, found again on --resume, checked at the end.

A shard is written to a temporary name in the same folder and renamed into place (os.replace is atomic on one
filesystem), so a reader only ever sees whole shards; a run killed mid-write leaves a `.tmp-` file, removed by the
next run. A shard is named by a hash of its rows' ids, so a batch that Ray retries writes the same name again
instead of a second copy. `deduplicate` covers what naming cannot (a worker of a killed run finishing a shard
while the resumed run answers the same ids): it keeps each id in the first shard by name and rewrites the others.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorpusError

FORMATS = ("parquet", "jsonl")
SHARD_PREFIX, TEMP_PREFIX = "shard-", ".tmp-"
TOKEN_FIELDS = ("frames", "keyframes", "visual_tokens", "full_visual_tokens", "prompt_tokens", "generated_tokens")
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("video", pa.string()), ("question", pa.string()), ("ok", pa.bool_()),
    ("text", pa.string()), ("token_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()),
    ("error", pa.string()), ("error_kind", pa.string()),
    *[(name, pa.int64()) for name in TOKEN_FIELDS],
    ("timings_ms", pa.map_(pa.string(), pa.float64())), ("notice", pa.string()),
    ("decoded_on", pa.string()), ("answered_on", pa.string()),  # host:pid of the decode task and of the engine actor
    ("focus", pa.string()),  # a focus job's FocusInfo as JSON (segments, dense frames, extra cost); null otherwise
])


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise CorpusError(f"output format {fmt!r} is unknown: expected one of {FORMATS}")
    return fmt


def shard_name(ids, fmt: str) -> str:
    digest = hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:24]
    return f"{SHARD_PREFIX}{digest}.{fmt}"


def list_shards(directory: str) -> list[str]:
    """Completed shard file names in the folder, sorted (temporary files are not shards)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name.startswith(SHARD_PREFIX) and name.rsplit(".", 1)[-1] in FORMATS)


def write_shard(table: pa.Table, directory: str, fmt: str) -> str:
    """Writes the rows as one shard, all or nothing; returns the shard's file name."""
    table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    name = shard_name(table.column("id").to_pylist(), fmt)
    temp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        if fmt == "parquet":
            pq.write_table(table, temp)
        else:
            with open(temp, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(_json_row(row)) + "\n" for row in table.to_pylist())
        with open(temp, "rb") as handle:  # the data reaches the disk before the name does
            os.fsync(handle.fileno())
        os.replace(temp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return name


def read_shard(path: str, columns=None) -> pa.Table:
    """One shard's rows (optionally only `columns`) as a table in OUTPUT_SCHEMA."""
    if path.endswith(".parquet"):
        return pq.read_table(path, columns=columns, schema=OUTPUT_SCHEMA)
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    for row in rows:
        row["timings_ms"] = list(row["timings_ms"].items())
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    return table.select(columns) if columns else table


def remove_temp_files(directory: str) -> int:
    """Deletes what interrupted writes left behind; returns how many."""
    stale = [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]
    for name in stale:
        os.unlink(os.path.join(directory, name))
    return len(stale)


def written_ids(directory: str) -> dict[str, str]:
    """{id: shard name} over every completed shard (the first shard by name, if an id is in several)."""
    owners: dict[str, str] = {}
    for name in list_shards(directory):
        for row_id in read_shard(os.path.join(directory, name), ["id"]).column("id").to_pylist():
            owners.setdefault(row_id, name)
    return owners


def deduplicate(directory: str, fmt: str) -> int:
    """Leaves each id in exactly one shard (the first by name): a shard holding ids already in an earlier one is
    rewritten without them (new shard first, then the old one removed, so a crash in between only leaves
    duplicates for the next run to remove). Returns how many duplicate rows went."""
    seen: set = set()
    removed = 0
    for name in list_shards(directory):
        path = os.path.join(directory, name)
        table = read_shard(path)
        ids = table.column("id").to_pylist()
        keep = []
        for index, row_id in enumerate(ids):
            if row_id not in seen:
                seen.add(row_id)
                keep.append(index)
        if len(keep) == len(ids):
            continue
        removed += len(ids) - len(keep)
        if keep:
            write_shard(table.take(keep), directory, fmt)
        os.unlink(path)
    return removed


def check_complete(directory: str, expected_ids) -> Counter:
    """Asserts every expected id has exactly one row and no other id has any; returns the ids' row counts."""
    counts: Counter = Counter()
    for name in list_shards(directory):
        counts.update(read_shard(os.path.join(directory, name), ["id"]).column("id").to_pylist())
    expected = set(expected_ids)
    missing = expected - set(counts)
    extra = set(counts) - expected
    repeated = [i for i, n in counts.items() if n > 1]
    if missing or extra or repeated:
        raise CorpusError(f"output {directory!r} is not one row per manifest id: {len(missing)} missing "
                          f"{sorted(missing)[:5]}, {len(extra)} not in the manifest {sorted(extra)[:5]}, "
                          f"{len(repeated)} repeated {sorted(repeated)[:5]}; rerun with --resume to finish it")
    return counts


def _json_row(row: dict) -> dict:
    row["timings_ms"] = dict(row["timings_ms"] or [])
    return row
