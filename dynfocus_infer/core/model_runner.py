"""Runs one scheduled step on the model: packs the rows of every chunk, runs the LLM over the paged cache, samples
the sequences whose chunk reached their last token, and starts bringing back tokens (and logprobs when asked) in one
non-blocking copy per tensor (`PendingSample`). The engine resolves a step's sample after launching the next one, so
the host waits for step k while the device already runs step k + 1; a decode whose input token is still on its way
reads it from the previous step's device tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..models.llama import LlamaForCausalLM
from ..models.paged_cache import PagedKVCache, StepMetadata
from ..sampling import BatchSampler, Logprob, sampling_masks
from .scheduler import ScheduledChunk


@dataclass
class SampledToken:
    token_id: int
    logprobs: Optional[dict] = None     # {token id: Logprob}: the sampled token and the top-N


class PendingSample:
    """The tokens one step sampled (device tensor `tokens`, row i for seqs[i]) and the logprob tensors asked for,
    copied to pinned host memory without blocking; `resolve()` waits for those copies alone (an event recorded
    after them), never for work queued later. On a CPU the copies are plain and the event is absent."""

    def __init__(self, seqs: list, tokens: torch.Tensor, logprob_tensors: Optional[tuple] = None):
        self.seqs, self.tokens = seqs, tokens
        self.row_of = {seq.seq_id: row for row, seq in enumerate(seqs)}
        self.sample_index = [seq.num_output_tokens for seq in seqs]   # which output token each row is
        tensors = (tokens,) + (logprob_tensors or ())
        self._host = [_to_host(t) for t in tensors]
        self._event = None
        if tokens.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._has_logprobs = logprob_tensors is not None

    def resolve(self) -> list[SampledToken]:
        """The sampled token of each of `seqs`, in order (with its logprobs when its request asked)."""
        if self._event is not None:
            self._event.synchronize()
        host = [t.tolist() for t in self._host]
        if not self._has_logprobs:
            return [SampledToken(t) for t in host[0]]
        tokens, chosen, rank, top_values, top_ids = host
        results = []
        for i, seq in enumerate(self.seqs):
            entry = None
            if seq.params.logprobs is not None:
                n = seq.params.logprobs
                entry = {tid: Logprob(v, r + 1) for r, (tid, v) in enumerate(zip(top_ids[i][:n], top_values[i][:n]))}
                entry[tokens[i]] = Logprob(chosen[i], rank[i])
            results.append(SampledToken(tokens[i], entry))
        return results


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_cuda:
        return tensor.clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class ModelRunner:
    def __init__(self, llm: LlamaForCausalLM, cache: PagedKVCache, eos_token_ids, graphs=None):
        """graphs: a cuda_graphs.DecodeGraphs for decode-only steps (CUDA only), or None for eager steps."""
        self.llm, self.cache, self.graphs = llm, cache, graphs
        self.eos_token_ids = list(eos_token_ids)
        self.device = llm.model.embed_tokens.weight.device
        self.dtype = llm.model.embed_tokens.weight.dtype
        self._pin = self.device.type == "cuda"

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self._pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, StepMetadata]:
        """Packed input embeddings [T, hidden] and the step's metadata."""
        return self._embeddings(chunks), self.metadata(chunks)

    def metadata(self, chunks: list[ScheduledChunk]) -> StepMetadata:
        """Where each packed row goes, built on the host and copied once per tensor."""
        block_size = self.cache.block_size
        positions = [np.arange(c.start, c.start + c.length) for c in chunks]
        slots = []
        for chunk, pos in zip(chunks, positions):
            table = np.asarray(chunk.seq.block_table, dtype=np.int64)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        lengths = np.array([c.length for c in chunks], dtype=np.int64)
        context = np.array([c.start + c.length for c in chunks], dtype=np.int64)
        widest = max(len(c.seq.block_table) for c in chunks)
        tables = np.zeros((len(chunks), widest), dtype=np.int32)
        for row, chunk in enumerate(chunks):
            tables[row, :len(chunk.seq.block_table)] = chunk.seq.block_table
        cu_q = np.concatenate([[0], np.cumsum(lengths)])
        sampled = np.array([cu_q[i + 1] - 1 for i, c in enumerate(chunks) if c.samples], dtype=np.int64)
        meta = StepMetadata(
            positions=self._to_device(np.concatenate(positions)),
            seq_index=self._to_device(np.repeat(np.arange(len(chunks)), lengths)),
            slot_mapping=self._to_device(np.concatenate(slots)),
            cu_seqlens_q=self._to_device(cu_q.astype(np.int32)),
            cu_seqlens_k=self._to_device(np.concatenate([[0], np.cumsum(context)]).astype(np.int32)),
            context_lens=self._to_device(context.astype(np.int32)),
            block_tables=self._to_device(tables),
            logits_rows=self._to_device(sampled),
            max_query_len=int(lengths.max()), max_context_len=int(context.max()),
            host_query_lens=tuple(lengths.tolist()), host_context_lens=tuple(context.tolist()))
        return meta

    def _generated_ids(self, chunks: list[ScheduledChunk], previous: Optional[PendingSample]):
        """Device ids of every generated position the chunks compute (decodes, and recomputation after
        preemption), in chunk order, and each chunk's (offset, count) in them. An id still on its way to the host
        (a sequence's newest token, sampled by the previous step) is read from that step's device tensor."""
        token_ids, spans, late_rows, late_sources = [], [], [], []
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.length
            first = max(chunk.start, seq.prompt_len) - seq.prompt_len
            last = end - seq.prompt_len
            spans.append((len(token_ids), max(0, last - first)))
            if last <= first:
                continue
            known = seq.output_ids[first:last]
            token_ids.extend(known)
            if len(known) < last - first:      # the one pending token: the last position of this chunk
                late_rows.append(len(token_ids))
                late_sources.append(previous.row_of[seq.seq_id])
                token_ids.append(0)
        if not token_ids:
            return None, spans
        ids = self._to_device(np.asarray(token_ids, dtype=np.int64))
        if late_rows:
            ids[self._to_device(np.asarray(late_rows))] = previous.tokens[self._to_device(np.asarray(late_sources))]
        return ids, spans

    def _embeddings(self, chunks: list[ScheduledChunk], previous: Optional[PendingSample] = None) -> torch.Tensor:
        """Prompt rows come from each sequence's prompt embeddings (text and visual tokens spliced); generated
        positions from the token embedding table, in one lookup."""
        ids, spans = self._generated_ids(chunks, previous)
        table = None if ids is None else self.llm.embed(ids)
        parts = []
        for chunk, (offset, count) in zip(chunks, spans):
            seq, end = chunk.seq, chunk.start + chunk.length
            if chunk.start < seq.prompt_len:
                parts.append(seq.prompt_embeds[chunk.start:min(end, seq.prompt_len)])
            if count:
                parts.append(table[offset:offset + count])
        return parts[0].to(self.dtype) if len(parts) == 1 else torch.cat([p.to(self.dtype) for p in parts])

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict:
        """launch() and resolve at once: {seq_id: SampledToken} for every chunk that reached its last token."""
        pending = self.launch(chunks)
        if pending is None:
            return {}
        return {seq.seq_id: token for seq, token in zip(pending.seqs, pending.resolve())}

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk], previous: Optional[PendingSample] = None
               ) -> Optional[PendingSample]:
        """Queue the step and the copy of its samples (None when no chunk reaches its sequence's last token).
        previous: the unresolved sample of the step before, whose device tokens are the inputs of its decodes.
        Prompt logprobs of a chunk's prompt rows are appended to seq.prompt_logprobs when asked (a host copy
        made for those requests only)."""
        meta = self.metadata(chunks)
        sampling = [c for c in chunks if c.samples]
        if self._graph_step(chunks):
            ids, _ = self._generated_ids(chunks, previous)
            logits = self.graphs.run(ids, meta).float()
        else:
            hidden = self.llm.step(self._embeddings(chunks, previous), self.cache, meta)
            first_row = 0
            for chunk in chunks:
                if chunk.seq.params.prompt_logprobs is not None and chunk.start < chunk.seq.prompt_len:
                    self._prompt_logprobs(chunk, hidden, first_row)
                first_row += chunk.length
            if not sampling:
                return None
            logits = self.llm.logits(hidden[meta.logits_rows]).float()
        seqs = [c.seq for c in sampling]
        steps = self._to_device(np.asarray([s.num_output_tokens for s in seqs], dtype=np.int64))
        sampler = BatchSampler([s.params for s in seqs], self.device, seeds=[s.seed for s in seqs])
        tokens = sampler(sampling_masks(logits, seqs, self.eos_token_ids), steps)
        if all(s.params.logprobs is None for s in seqs):
            return PendingSample(seqs, tokens)
        return PendingSample(seqs, tokens, self._logprob_tensors(seqs, logits, tokens))

    def _graph_step(self, chunks: list[ScheduledChunk]) -> bool:
        """Decode-only (one generated-token row per sequence) and small enough for a captured graph."""
        return (self.graphs is not None and self.graphs.fits(len(chunks))
                and all(c.length == 1 and c.start >= c.seq.prompt_len for c in chunks))

    @staticmethod
    def _logprob_tensors(seqs, logits, tokens) -> tuple:
        """(chosen logprob [R], its rank [R], top values [R, N], top ids [R, N]) with N the largest asked for."""
        top = max(s.params.logprobs or 0 for s in seqs)
        logp = logits.log_softmax(-1)
        chosen = logp.gather(1, tokens[:, None])
        rank = (logp > chosen).sum(-1) + 1
        top_values, top_ids = logp.topk(max(top, 1), dim=-1)
        return chosen[:, 0], rank, top_values, top_ids

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: torch.Tensor, first_row: int) -> None:
        """Logprob of each prompt token given the positions before it (text tokens only: a visual row has no id,
        so its entry is None, as is the first token's). Recomputation after preemption records nothing twice."""
        seq = chunk.seq
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        end = min(chunk.start + chunk.length, seq.prompt_len - 1)   # row p scores prompt token p + 1
        if end <= chunk.start or len(seq.prompt_logprobs) >= seq.prompt_len:
            return
        targets = torch.tensor(seq.prompt_token_ids[chunk.start + 1:end + 1], device=self.device)
        logp = self.llm.logits(hidden[first_row:first_row + end - chunk.start]).float().log_softmax(-1)
        chosen = logp.gather(1, targets.clamp_min(0)[:, None])[:, 0]
        rank = (logp > chosen[:, None]).sum(-1) + 1
        n = seq.params.prompt_logprobs
        top_values, top_ids = logp.topk(max(n, 1), dim=-1)
        host = [t.tolist() for t in (targets, chosen, rank, top_values, top_ids)]
        for i, position in enumerate(range(chunk.start + 1, end + 1)):
            if position != len(seq.prompt_logprobs):
                continue
            entry = None
            if host[0][i] >= 0:
                entry = {tid: Logprob(v, r + 1) for r, (tid, v) in enumerate(zip(host[4][i][:n], host[3][i][:n]))}
                entry[host[0][i]] = Logprob(host[1][i], host[2][i])
            seq.prompt_logprobs.append(entry)
