"""run_corpus: a manifest through a Ray Data pipeline (read -> CPU decode -> engine actor pool -> shard writes).

Ray schedules, backpressures, retries and places everything: decode tasks take `decode_cpus` CPUs each; the
answering actors hold one engine each (num_gpus per actor = num_gpus / concurrency, or CPU actors); Ray Data
restarts an actor that dies and retries its batch on a live one. Exactly one row per id: the manifest's ids are
unique (checked first), --resume drops ids already in a completed shard before the pipeline starts, shards are
written atomically under names hashed from their ids, and a last pass removes any duplicate and checks the output
holds every id once.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Optional

from ..errors import ConfigError
from .errors import CorpusError
from .job import SUMMARY_FILE, CorpusJob, prepare_output, write_json_atomically
from .manifest import read_manifest
from .shards import check_complete, deduplicate, list_shards, read_shard
from .summary import CorpusSummary

ROWS_PER_SHARD = 16  # the most rows in one shard (and in one input block): what an interruption can lose


def run_corpus(input: str, output: str, *, job: Optional[CorpusJob] = None, address: Optional[str] = None,
               num_gpus: Optional[float] = None, concurrency: Optional[int] = None, decode_cpus: float = 1.0,
               resume: bool = False, batch_size: int = 8, rows_per_shard: int = ROWS_PER_SHARD,
               ray_init_kwargs: Optional[dict] = None, progress: bool = True) -> CorpusSummary:
    """Answers every row of the manifest `input` into shards under `output`; returns the run's summary.

    address: None starts (or reuses) a local Ray instance sized to the machine (ray_init_kwargs go to ray.init);
    "auto" or "ray://host:port" joins a cluster. num_gpus: GPUs to answer on (default: every GPU of the cluster;
    0 answers on CPU actors); concurrency: engine actors (default: num_gpus, or 1 on CPU), a multiple of num_gpus.
    decode_cpus: CPUs per decode task. Raises CorpusError before any work for a bad manifest or output folder."""
    job = job or CorpusJob()
    for name, value in (("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"run_corpus {name} = {value!r}: expected an integer >= 1")
    if not decode_cpus > 0:
        raise ConfigError(f"run_corpus decode_cpus = {decode_cpus!r}: expected a number of CPUs > 0")
    if address is None:
        _check_model_here(job.model)
    rows = read_manifest(input)
    if job.decode_in_engine:
        _check_engine_sampling(input, rows, job)
    ids = [row["id"] for row in rows]
    output = os.path.abspath(output)
    done = prepare_output(output, job, ids, resume)
    todo = [row for row in rows if row["id"] not in done]
    start = time.perf_counter()
    written = _run_pipeline(todo, output, job, address, num_gpus, concurrency, decode_cpus, batch_size,
                            rows_per_shard, ray_init_kwargs or {}, progress) if todo else []
    wall_s = time.perf_counter() - start
    return _finish(output, job, ids, len(done), written, wall_s)


def _run_pipeline(rows: list, output: str, job: CorpusJob, address, num_gpus, concurrency, decode_cpus: float,
                  batch_size: int, rows_per_shard: int, ray_init_kwargs: dict, progress: bool) -> list:
    """Runs the Ray Data pipeline over `rows`; returns the writer's small per-row records (pyarrow tables)."""
    try:
        import ray
    except ImportError as error:
        raise CorpusError(f"corpus inference needs Ray Data: pip install 'dynfocus-infer[distributed]' "
                          f"({error})") from error

    if not ray.is_initialized():
        # No address means a new local instance, sized to the machine by Ray (ray_init_kwargs may size it down):
        # "local", because ray.init() without one would join whatever cluster `ray start` last recorded here or
        # RAY_ADDRESS names. A cluster already has its size and dashboard.
        local = {} if address else dict(include_dashboard=False)
        ray.init(address=address or "local", **local, **ray_init_kwargs)
    actors, gpus_per_actor = _actor_pool_size(ray.cluster_resources(), num_gpus, concurrency, address is None)
    context = ray.data.DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = progress
    try:
        return _execute(rows, output, job, actors, gpus_per_actor, decode_cpus, batch_size, rows_per_shard)
    finally:
        context.enable_progress_bars = shown


def _execute(rows: list, output: str, job: CorpusJob, actors: int, gpus_per_actor: float, decode_cpus: float,
             batch_size: int, rows_per_shard: int) -> list:
    """read -> decode (CPU tasks) -> engine-sized blocks -> answer (engine actors) -> write shards (tasks)."""
    import pyarrow as pa
    import ray

    from .stages import MANIFEST_SCHEMA, Answerer, decode_batch, write_batch

    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    blocks = [table.slice(offset, rows_per_shard) for offset in range(0, table.num_rows, rows_per_shard)]
    dataset = ray.data.from_arrow(blocks)
    # Where the engines decode, this stage only checks each file (stat): it reserves no CPU.
    dataset = dataset.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=1, num_cpus=0 if job.decode_in_engine else decode_cpus,
        fn_kwargs=dict(frame_sampling=job.frame_sampling, backend=job.video_backend, timeout_s=job.video_timeout_s,
                       in_engine=job.decode_in_engine))
    # Engine-sized blocks: also keeps decoding a task stage of its own (Ray Data would otherwise fuse a task map
    # into the actor map when their resources match, e.g. CPU engines with --decode-cpus 1, and decode inside
    # the engine's process).
    dataset = dataset.repartition(target_num_rows_per_block=batch_size)
    # Ray Data's actor pools restart a dead actor and retry its batch on a live one (max_restarts and
    # max_task_retries default to -1 there); tests/test_corpus_ray.py checks it.
    dataset = dataset.map_batches(
        Answerer, batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor, num_cpus=1,
        fn_constructor_kwargs=dict(model=job.model, engine_kwargs=job.engine_arguments(), sampling=job.sampling,
                                   focus=job.focus, frame_sampling=job.frame_sampling if job.decode_in_engine else None))
    # Writing a shard is a moment of I/O: it reserves no CPU, so shards land as rows finish instead of waiting for
    # a CPU slot that decode tasks and engines keep busy (an interruption then loses only the rows in flight).
    dataset = dataset.map_batches(write_batch, batch_format="pyarrow", batch_size=rows_per_shard, num_cpus=0,
                                  fn_kwargs=dict(directory=output, fmt=job.output_format))
    return list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))


def _check_engine_sampling(input: str, rows: list, job: CorpusJob) -> None:
    """Where the engines decode, fps sampling is capped by the job's max_frames for every row: a row asking for
    another cap is refused before any work."""
    for row in rows:
        if row.get("fps") is not None and row.get("max_frames") not in (None, job.max_frames):
            raise CorpusError(f"manifest {input!r}, row {row['id']!r}: max_frames = {row['max_frames']}, but this job's "
                              f"engines decode the videos (focus, or a SlowFocus model) and cap fps sampling at the "
                              f"job's max_frames ({job.max_frames}) for every row")


def _check_model_here(model: str) -> None:
    """On one machine a model that is neither a preset nor a folder fails now, not in every engine actor."""
    from ..presets import PRESETS, SLOWFOCUS_MODELS

    if model not in PRESETS + SLOWFOCUS_MODELS and not os.path.isdir(model):
        raise CorpusError(f"model {model!r} is neither a preset ({', '.join(PRESETS + SLOWFOCUS_MODELS)}) nor a "
                          f"checkpoint directory")


def _actor_pool_size(resources: dict, num_gpus, concurrency, local: bool) -> tuple[int, float]:
    """(engine actors, GPUs per actor): one engine per GPU by default, CPU engines when there is no GPU."""
    available = int(resources.get("GPU", 0))
    num_gpus = available if num_gpus is None else num_gpus
    if not isinstance(num_gpus, int) or num_gpus < 0:
        raise ConfigError(f"num_gpus = {num_gpus!r}: expected an integer >= 0 (0 answers on CPU)")
    if local and num_gpus > available:
        raise CorpusError(f"num_gpus = {num_gpus} but this machine's Ray sees {available} GPU(s)")
    if concurrency is None:
        concurrency = max(1, num_gpus)
    if not isinstance(concurrency, int) or concurrency < 1 or (num_gpus and concurrency % num_gpus):
        raise ConfigError(f"concurrency = {concurrency!r}: expected an integer >= 1, a multiple of num_gpus "
                          f"({num_gpus}) so every GPU holds the same number of engines")
    return concurrency, (num_gpus / concurrency if num_gpus else 0)


def _finish(output: str, job: CorpusJob, ids: list, already_written: int, written: list,
            wall_s: float) -> CorpusSummary:
    """Removes duplicate rows, checks one row per id, and summarises (failures over the whole output)."""
    duplicates = deduplicate(output, job.output_format)
    check_complete(output, ids)
    kinds: Counter = Counter()
    for name in list_shards(output):
        kinds.update(k for k in read_shard(os.path.join(output, name), ["error_kind"]).column("error_kind").to_pylist()
                     if k is not None)
    answered = sum(t.column("ok").to_pylist().count(True) for t in written)
    processed = sum(t.num_rows for t in written)
    tokens = sum(sum(t.column("generated_tokens").to_pylist()) for t in written)
    summary = CorpusSummary(output=output, output_format=job.output_format, total=len(ids),
                            already_written=already_written, answered=answered, failed=processed - answered,
                            generated_tokens=tokens, wall_s=wall_s, failures_by_kind=dict(kinds),
                            shards=len(list_shards(output)), duplicates_removed=duplicates)
    write_json_atomically(os.path.join(output, SUMMARY_FILE), summary.to_dict())
    return summary
