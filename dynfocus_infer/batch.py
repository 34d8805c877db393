"""`dynfocus-infer batch`: a JSONL file of requests in, one result line per request out, written as each finishes.

Order of work: the options, the input and every line are checked, and the output is opened and locked, all before
the model loads; lines that fail those checks get their error as their result without a model. SIGINT / SIGTERM end
the run cleanly (exit 130 / 143): every finished result is in the output and a one-line summary says what was
written; `--resume` then skips the ids already there.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Callable, Optional

from .batch_output import STDOUT, ResultWriter
from .errors import DynFocusError, OutputError
from .interrupts import Interrupted, InterruptGuard
from .outputs import RequestOutput
from .request_checks import check_request


def read_request_lines(path: str) -> list:
    """(line number, request dict or the error that line gets as its result) for each non-blank line. Every request
    gets an id: its own, else its line number."""
    items = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError("a line must hold a JSON object")
            except ValueError as error:
                items.append((number, str(number), DynFocusError(f"line {number}: not a JSON request object ({error})")))
                continue
            given = value.get("id", value.get("request_id"))
            items.append((number, str(number) if given is None else str(given), value))
    return items


def output_problem(output: str, input_path: str) -> Optional[str]:
    """Why the results cannot go to `output`, or None; checked without creating or truncating anything."""
    if output == STDOUT:
        return None
    directory = os.path.dirname(os.path.abspath(output))
    if os.path.exists(output) and os.path.samefile(output, input_path):
        return "it is the input file"
    if os.path.isdir(output):
        return "it is a directory"
    if not os.path.isdir(directory):
        return f"its directory {directory!r} does not exist"
    if os.path.exists(output) and not os.access(output, os.W_OK):
        return "no permission to write it"
    if not os.path.exists(output) and not os.access(os.path.dirname(os.path.realpath(output)), os.W_OK):
        return "no permission to write it"
    return None


def _prepare(lines: list, base_dir: str, focus=None) -> list:
    """(id, request dict with its id and resolved video, or the error it fails with) per line. focus: the --focus
    of the lines with a video and without a "focus" key (a line's own "focus": null turns it off)."""
    prepared = []
    for number, request_id, item in lines:
        if isinstance(item, dict):
            if focus is not None and "focus" not in item and (item.get("video") or item.get("multi_modal_data")):
                item = {**item, "focus": focus}
            try:
                item = check_request({**item, "id": request_id} if "request_id" not in item else item, base_dir)
            except DynFocusError as error:
                item = error
        prepared.append((request_id, item))
    return prepared


def _summary(writer: ResultWriter, skipped: int, not_run: int) -> str:
    answered = writer.num_written - writer.num_failed
    where = "standard output" if writer.path == STDOUT else writer.path
    text = f"{answered} answered, {writer.num_failed} failed -> {where}"
    if skipped:
        text += f"; {skipped} skipped (already in the output)"
    if not_run:
        text += f"; {not_run} not run (rerun with --resume to finish them)"
    return text


def run_batch(args, build_engine: Callable, sampling) -> int:
    """The batch command after option checks; returns the exit code. build_engine(args, batch_size) loads the model."""
    problem = output_problem(args.output, args.input)
    if problem:  # found before any work, and an existing output is left as it is
        raise OutputError(f"--output {args.output!r}: {problem}")
    try:
        lines = read_request_lines(args.input)
    except UnicodeDecodeError as error:
        raise DynFocusError(f"input {args.input!r} is not UTF-8 text ({error.reason})") from None
    prepared = _prepare(lines, os.path.dirname(os.path.abspath(args.input)), getattr(args, "focus", None))
    guard = InterruptGuard()
    writer = ResultWriter(args.output, resume=args.resume, guard=guard)
    todo = [(request_id, item) for request_id, item in prepared if request_id not in writer.done_ids]
    skipped, llm = len(prepared) - len(todo), None
    try:
        with guard:
            live = []
            for slot, (request_id, item) in enumerate(todo):
                if isinstance(item, dict):
                    live.append(slot)
                else:
                    writer.put(slot, RequestOutput(request_id, error=str(item)).to_dict())
            if live:
                llm = build_engine(args, args.batch_size)
                for chunk in llm.stream([todo[slot][1] for slot in live], sampling, progress=True):
                    if chunk.finished:
                        writer.put(live[chunk.index], chunk.output.to_dict())
    except Interrupted as stop:
        with guard.shielded():  # a second Ctrl-C must not cut the clean-up short
            writer.write_held()
            writer.close(complete=False)
            loader = getattr(llm, "loader", None)
            if loader is not None:
                loader.close()  # queued decodes are dropped, so the exit does not wait for them
        print(f"\ndynfocus-infer: interrupted by {stop}: "
              f"{_summary(writer, skipped, len(todo) - writer.num_written)}", file=sys.stderr)
        return stop.exit_code
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised may be this very output's (a closed pipe)
            writer.write_held()
        writer.close(complete=False)
        raise
    writer.close(complete=True)
    print(f"dynfocus-infer: {_summary(writer, skipped, 0)}", file=sys.stderr)
    return 0
