"""The engine loop (vLLM's LLMEngine shape): `add_request`, `step`, `abort`.

Each step: the visual stage takes the videos whose decoding finished and encodes a budget of them; requests whose
prompt embeddings are ready become sequences (n per request) in the scheduler's waiting queue; the scheduler packs
running decodes and new prefill chunks into one forward over the paged KV cache; sampled tokens are copied back
without blocking and resolved after the NEXT step is launched (async_output, the default on CUDA: the host waits
for step k's tokens while the device runs step k + 1, whose decodes read their input ids from step k's device
tensor), detokenised incrementally, and checked for EOS / stop tokens / stop strings / max_tokens; finished
sequences free their blocks at once. The lag costs one wasted decode row per sequence that ends on EOS or a stop
(max_tokens is known ahead and never overruns); penalised sequences wait for their newest token before sampling.
`step` returns a RequestOutput for every request that produced something (a token, an error, its end): every token
is streamed as soon as it reaches the host.

Prefix caching (block_manager): a request's prompt blocks are content-hashed when it starts (its visual rows are
copied to the host for that, one copy for every request a step starts: on CUDA the one wait it adds, outside the
decode-only steps), and a sequence computes only what no earlier prompt computed already.

Failures stay with their request: bad input and video errors at their stage; a step that raises is retried with
each of its sequences alone (scheduler's `suspect`), so the one that fails alone gets the error.
"""
from __future__ import annotations

import itertools
import time
from typing import Optional

import numpy as np
import torch

from ..attention import attention_backend
from ..errors import DynFocusError, RequestError, VideoDecodeError
from ..models.paged_cache import PagedKVCache, StepMetadata, kv_bytes_per_token
from ..outputs import CompletionOutput, Request, RequestOutput
from ..sampling import SamplingParams, child_seed, fresh_seed
from .block_manager import BlockManager, prompt_block_hashes
from .detokenizer import IncrementalDetokenizer
from .kv_budget import CacheConfig, kv_budget_bytes, num_blocks_for
from .model_runner import ModelRunner
from .request_state import RequestState
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .visual_stage import VisualStage


def error_text(error: BaseException) -> str:
    """What a failed request reports: our typed errors as they are, anything else marked internal."""
    kind = "" if isinstance(error, DynFocusError) else f"internal error ({type(error).__name__}): "
    return f"{kind}{error}"


class LLMEngine:
    def __init__(self, loaded, visual: VisualStage, cache_config: CacheConfig, notice: Optional[str] = None,
                 enforce_eager: bool = False, graph_capture=None, async_output: Optional[bool] = None):
        """enforce_eager: never capture CUDA graphs (they are captured on CUDA only, per batch bucket).
        async_output: resolve each step's tokens after launching the next (default: on CUDA, where the device then
        never waits for the host; on a CPU there is nothing to overlap, so each step resolves its own).
        graph_capture: a stand-in for CUDA graph capture (cuda_graphs.DecodeGraphs' `capture`), which also turns
        the graph path on off CUDA: for testing its buffers and padding on a CPU."""
        self.loaded, self.visual, self.notice = loaded, visual, notice
        llm = loaded.model.llm
        llm.fuse_projections()
        self.device = llm.model.embed_tokens.weight.device
        self.dtype = llm.model.embed_tokens.weight.dtype
        self.config = cache_config.resolved(loaded.context_length,
                                            attention_backend(self.device, self.dtype) == "flash_attn")
        budget = kv_budget_bytes(self.config, self.device, self._warm_up)
        num_blocks = num_blocks_for(self.config, budget, kv_bytes_per_token(llm.config, self.dtype))
        use_graphs = (self.device.type == "cuda" and not enforce_eager) or graph_capture is not None
        self.cache = PagedKVCache(llm.config, num_blocks + use_graphs, self.config.block_size, self.dtype,
                                  self.device)
        self.blocks = BlockManager(num_blocks, self.config.block_size,  # the extra block: graph padding rows
                                   self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        graphs = None
        if use_graphs:
            from .cuda_graphs import DecodeGraphs
            graphs = DecodeGraphs(llm, self.cache, self.config.max_num_seqs, self.config.max_model_len, num_blocks,
                                  capture=graph_capture)
        self.runner = ModelRunner(llm, self.cache, loaded.eos_token_ids, graphs)
        self.async_output = self.device.type == "cuda" if async_output is None else bool(async_output)
        self._pending = None               # the launched step whose tokens are not on the host yet
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._ready_outputs: list[RequestOutput] = []
        self.max_blocks_used = 0

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def _warm_up(self) -> None:
        """A forward at the largest step (max_num_batched_tokens rows, capped at max_model_len) on a throwaway
        cache: the CUDA memory it peaks at is what the KV budget must leave free."""
        llm, rows = self.loaded.model.llm, min(self.config.max_num_batched_tokens, self.config.max_model_len)
        cache = PagedKVCache(llm.config, -(-rows // self.config.block_size), self.config.block_size, self.dtype,
                             self.device)
        positions = torch.arange(rows, device=self.device)
        meta = StepMetadata(positions, torch.zeros_like(positions), positions,
                            torch.tensor([0, rows], dtype=torch.int32, device=self.device),
                            torch.tensor([0, rows], dtype=torch.int32, device=self.device),
                            torch.tensor([rows], dtype=torch.int32, device=self.device),
                            torch.arange(cache.num_blocks, dtype=torch.int32, device=self.device)[None],
                            torch.tensor([rows - 1], device=self.device), rows, rows)
        hidden = llm.step(torch.zeros(rows, llm.config.hidden_size, dtype=self.dtype, device=self.device), cache, meta)
        llm.logits(hidden[meta.logits_rows])
        del cache

    # -- requests ------------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, request, params: Optional[SamplingParams] = None,
                    output_id: Optional[str] = None) -> None:
        """Queue a request (a Request, a dict in either shape, or a question string). A request_id already in the
        engine is a RequestError; a malformed request or video fails alone: its error is the next step's output
        for it. output_id: the id its outputs carry (default request_id)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in the engine: request ids must be unique")
        params = params or SamplingParams()
        seed = params.seed if params.seed is not None else fresh_seed()
        state = RequestState(str(request_id), None, params, seed)
        state.output_id = str(output_id if output_id is not None else request_id)
        self.requests[state.request_id] = state
        try:
            state.request = request if isinstance(request, Request) else Request.coerce(request)
            self.visual.submit(state)
        except Exception as error:  # noqa: BLE001 - this request's failure alone
            self._fail(state, error)

    def abort(self, request_id: str) -> bool:
        """Stop a request now: its KV blocks are free for the next step. False when it is unknown or finished."""
        state = self.requests.get(request_id)
        if state is None or state.finished:
            return False
        state.aborted = True
        self.visual.drop(state)
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)
        self._finish(state)
        self._ready_outputs.append((request_id, self._output(state, "abort")))
        del self.requests[request_id]
        return True

    def stats(self) -> dict:
        """Load and capacity now (for /metrics and admission decisions upstream)."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "encoding": self.visual.in_progress,
                "kv_blocks_total": self.blocks.num_blocks, "kv_blocks_used": self.blocks.num_used,
                "kv_usage": self.blocks.num_used / self.blocks.num_blocks, "block_size": self.blocks.block_size,
                "preemptions": self.scheduler.num_preemptions, "prefix_cache_queries": self.blocks.prefix_queries,
                "prefix_cache_hits": self.blocks.prefix_hits, "kv_blocks_cached": self.blocks.num_cached, "max_model_len": self.max_model_len,
                "max_num_seqs": self.config.max_num_seqs}

    def has_unfinished_requests(self) -> bool:
        return bool(self._ready_outputs) or any(not s.finished for s in self.requests.values())

    # -- the step ------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step; a RequestOutput (its request_id the caller's id) for every request with news."""
        return [output for _, output in self.step_with_ids()]

    def step_with_ids(self) -> list[tuple[str, RequestOutput]]:
        """step(), each output paired with the engine request id it belongs to."""
        if not self.scheduler.has_work():
            self.visual.wait_for_video()
        ready, failures = self.visual.poll()
        for state, error in failures.items():
            self._fail(state, error)
        self._start_all(ready)
        touched = [s for s in self._run_model() if s.request_id in self.requests and s.streams_tokens]
        outputs, self._ready_outputs = self._ready_outputs, []
        outputs += [(state.request_id, self._output(state)) for state in touched]
        for state in touched:
            if state.finished:
                del self.requests[state.request_id]
        return outputs

    def _start_all(self, ready: list) -> None:
        """Prompt embeddings -> n sequences each in the waiting queue, with their prompt blocks' content hashes when
        prefix caching is on (the visual rows of every request started here reach the host in one copy)."""
        started = []
        for state in ready:
            try:
                started.append((state, *self.visual.prompt(state, self.max_model_len)))
            except Exception as error:  # noqa: BLE001 - this request's failure alone
                self._fail(state, error)
        try:
            visual_rows = self._visual_rows_on_host([(embeds, ids) for _, embeds, ids in started])
        except Exception:  # noqa: BLE001 - e.g. out of memory: these requests run without prefix caching
            visual_rows = None
        for (state, embeds, prompt_ids), rows in zip(started, visual_rows or [None] * len(started)):
            try:
                hashes = []
                if self.blocks.enable_prefix_caching and visual_rows is not None:
                    hashes = prompt_block_hashes(prompt_ids, rows, self.blocks.block_size)
                self._start(state, embeds, prompt_ids, hashes)
            except Exception as error:  # noqa: BLE001 - this request's failure alone
                self._fail(state, error)

    def _visual_rows_on_host(self, prompts: list) -> list:
        """Each prompt's visual-row embeddings on the host (None without prefix caching or without rows): one
        device-to-host copy for all of them, the one wait for the device this costs on CUDA."""
        if not self.blocks.enable_prefix_caching or not prompts:
            return [None] * len(prompts)
        rows = [embeds[torch.as_tensor(np.flatnonzero(np.asarray(ids) < 0), device=embeds.device)]
                for embeds, ids in prompts]          # indices from the host: a device mask would sync per prompt
        host = torch.cat(rows).cpu() if self.device.type != "cpu" else torch.cat(rows)
        return list(host.split([r.shape[0] for r in rows]))

    def _start(self, state: RequestState, embeds: torch.Tensor, prompt_ids: list, prompt_hashes: list) -> None:
        """n sequences of the prompt in the waiting queue."""
        max_new = min(state.params.max_tokens, self.max_model_len - embeds.shape[0])
        eos = [] if state.params.ignore_eos else list(self.loaded.eos_token_ids)
        skip = set(state.params.stop_token_ids) | set(eos)
        for index in range(state.params.n):
            seq = Sequence(next(self._seq_ids), state.request_id, index, state.params, child_seed(state.seed, index),
                           embeds, prompt_ids, max_new, prompt_hashes=prompt_hashes)
            state.seqs.append(seq)
            state.detokenizers.append(IncrementalDetokenizer(self.loaded.tokenizer, state.params.stop, skip))
            state.sent_tokens.append(0)
            self.scheduler.add(seq)
        state.stage, state.ready_time = "ready", time.perf_counter()

    def _run_model(self) -> list[RequestState]:
        """Launch this step, then bring back the previous step's tokens while it runs (the one-step output lag;
        with async_output off, each step's tokens come back before the step returns). A penalised sequence's newest
        token is brought back before scheduling, so a token that ends a sequence never finds it in the step."""
        touched: dict[str, RequestState] = {}
        if self._pending is not None and self._needs_host_tokens():
            self._resolve_pending(touched)
        try:
            chunks = self.scheduler.schedule()
            self.max_blocks_used = max(self.max_blocks_used, self.blocks.num_used)
            if not chunks:
                self._resolve_pending(touched)
                return list(touched.values())
            now = time.perf_counter()
            for chunk in chunks:
                if chunk.seq.first_scheduled_time is None:
                    chunk.seq.first_scheduled_time = now
            try:
                pending = self.runner.launch(chunks, self._pending)
            except Exception as error:  # noqa: BLE001 - pinned on one request below
                self._pin_failure(chunks, error, touched)
                return list(touched.values())
        except BaseException:   # interrupted (KeyboardInterrupt): blocks this step published may never be written
            self.blocks.reset_prefix_cache()
            raise
        for chunk in chunks:
            chunk.seq.num_computed += chunk.length
        for seq in pending.seqs if pending is not None else ():
            seq.num_pending += 1
        self._resolve_pending(touched)
        self._pending = pending
        if not self.async_output:
            self._resolve_pending(touched)
        return list(touched.values())

    def _pin_failure(self, chunks, error: BaseException, touched: dict) -> None:
        """A step raised: the request of a lone chunk fails; otherwise each sequence of the step runs alone from now
        on, so the one that fails alone gets the error. Every cached prefix is forgotten (the step's published
        blocks may never have been written)."""
        self._resolve_pending(touched)
        self.blocks.reset_prefix_cache()
        if len(chunks) == 1:
            self._fail(self.requests[chunks[0].seq.request_id], error)
            return
        for chunk in chunks:
            chunk.seq.suspect = True
            if chunk.seq.status is SequenceStatus.RUNNING:
                self.scheduler.preempt(chunk.seq)

    def _needs_host_tokens(self) -> bool:
        """Penalties count the generated ids on the host: a running penalised sequence's newest token must be
        there before it samples again."""
        return any(s.num_pending and s.params.penalised for s in self.scheduler.running)

    def _resolve_pending(self, touched: dict) -> None:
        """Wait for the unresolved step's tokens (that copy only) and append them to their sequences. A token of a
        sequence that ended meanwhile (EOS or a stop found one step late, abort, failure) is the lag's one wasted
        row: dropped."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for seq, index, sampled in zip(pending.seqs, pending.sample_index, pending.resolve()):
            seq.num_pending -= 1
            state = self.requests.get(seq.request_id)
            if state is None or state.finished or seq.finish_reason is not None or index != len(seq.output_ids):
                continue
            touched[state.request_id] = state
            try:
                self._append(state, seq, sampled)
            except Exception as error:  # noqa: BLE001 - a host-side failure (detokeniser) is this request's
                self._fail(state, error)

    def _append(self, state: RequestState, seq: Sequence, sampled) -> None:
        token = sampled.token_id
        seq.output_ids.append(token)
        if sampled.logprobs is not None:
            seq.logprobs.append(sampled.logprobs)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        detokenizer = state.detokenizers[seq.child_index]
        detokenizer.add(token)
        if token in detokenizer.skip_ids or detokenizer.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            detokenizer.finish()
            self.scheduler.remove(seq)
            seq.finish_time = time.perf_counter()
        if all(s.finish_reason is not None for s in state.seqs) and not self.visual.focus.finish_grounding(state):
            self._finish(state)

    # -- outputs -------------------------------------------------------------------------------------------------

    def _finish(self, state: RequestState) -> None:
        state.finished = True
        state.stage = "finished"

    def _fail(self, state: RequestState, error: BaseException) -> None:
        """End a request with its error; the error output goes out with this step's outputs."""
        self.visual.drop(state)
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
        state.error = error_text(error)
        self._finish(state)
        self._ready_outputs.append((state.request_id, RequestOutput(
            state.output_id, error=state.error, timings_ms=dict(state.timings_ms), tokens=state.tokens,
            notice=self.notice, focus=state.focus and state.focus.info,
            error_kind="video_decode" if isinstance(error, VideoDecodeError) else None)))
        self.requests.pop(state.request_id, None)

    def _timings(self, state: RequestState) -> dict:
        timings = dict(state.timings_ms)
        first = state.seqs[0] if state.seqs else None
        if first is not None and first.first_token_time is not None:
            timings["prefill"] = (first.first_token_time - first.first_scheduled_time) * 1e3
            timings["time_to_first_token"] = (first.first_token_time - state.arrival) * 1e3
            end = max(getattr(s, "finish_time", None) or time.perf_counter() for s in state.seqs)
            timings["decode_steps"] = (end - first.first_token_time) * 1e3
        return timings

    def _output(self, state: RequestState, finish_reason: Optional[str] = None) -> RequestOutput:
        completions = []
        for index, (seq, detokenizer) in enumerate(state.completions()):
            reason = seq.finish_reason if seq.finish_reason is not None else finish_reason
            new_ids = seq.output_ids[state.sent_tokens[index]:]
            state.sent_tokens[index] = len(seq.output_ids)
            logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None
            cumulative = None
            if logprobs:
                cumulative = sum(entry[t].logprob for entry, t in zip(logprobs, seq.output_ids))
            completions.append(CompletionOutput(index, detokenizer.text, list(seq.output_ids), reason, logprobs,
                                                cumulative, detokenizer.new_text(reason is not None), new_ids))
        if not completions:
            completions = [CompletionOutput(0, "", [], finish_reason)]
        state.tokens.generated_tokens = sum(len(s.output_ids) for s in state.seqs)
        if state.seqs:
            state.tokens.cached_tokens = state.seqs[0].cached_prompt_tokens or 0
        head = completions[0]
        prompt_logprobs = state.seqs[0].prompt_logprobs if state.seqs else None
        return RequestOutput(state.output_id, head.text, list(head.token_ids), head.finish_reason, None,
                             state.tokens, self._timings(state), self.notice, completions,
                             state.finished, prompt_logprobs, state.focus and state.focus.info)
