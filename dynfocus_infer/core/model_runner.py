"""Runs one scheduled step on the model: packs the rows of every chunk, runs the LLM over the paged cache, samples
the sequences whose chunk reached their last token, and brings back tokens (and logprobs when asked) in one copy."""
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
            max_query_len=int(lengths.max()), max_context_len=int(context.max()))
        return meta

    def _embeddings(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Prompt rows come from each sequence's prompt embeddings (text and visual tokens spliced); generated
        positions (decodes, and recomputation after preemption) from the token embedding table, in one lookup."""
        token_ids, pieces = [], []
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.length
            if chunk.start < seq.prompt_len:
                pieces.append(("prompt", seq.prompt_embeds[chunk.start:min(end, seq.prompt_len)]))
            if end > seq.prompt_len:
                first = max(chunk.start, seq.prompt_len) - seq.prompt_len
                ids = seq.output_ids[first:end - seq.prompt_len]
                pieces.append(("tokens", (len(token_ids), len(ids))))
                token_ids.extend(ids)
        table = None
        if token_ids:
            table = self.llm.embed(self._to_device(np.asarray(token_ids, dtype=np.int64)))
        parts = [p if kind == "prompt" else table[p[0]:p[0] + p[1]] for kind, p in pieces]
        return parts[0].to(self.dtype) if len(parts) == 1 else torch.cat([p.to(self.dtype) for p in parts])

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict:
        """{seq_id: SampledToken} for every chunk that reached its sequence's last token; prompt logprobs of the
        chunk's prompt rows are appended to seq.prompt_logprobs when the request asked for them."""
        meta = self.metadata(chunks)
        sampling = [c for c in chunks if c.samples]
        if self._graph_step(chunks):
            ids = [c.seq.output_ids[c.start - c.seq.prompt_len] for c in chunks]
            logits = self.graphs.run(self._to_device(np.asarray(ids, dtype=np.int64)), meta).float()
        else:
            hidden = self.llm.step(self._embeddings(chunks), self.cache, meta)
            first_row = 0
            for chunk in chunks:
                if chunk.seq.params.prompt_logprobs is not None and chunk.start < chunk.seq.prompt_len:
                    self._prompt_logprobs(chunk, hidden, first_row)
                first_row += chunk.length
            if not sampling:
                return {}
            logits = self.llm.logits(hidden[meta.logits_rows]).float()
        seqs = [c.seq for c in sampling]
        steps = torch.tensor([len(s.output_ids) for s in seqs], dtype=torch.int64)
        sampler = BatchSampler([s.params for s in seqs], self.device, seeds=[s.seed for s in seqs])
        processed = sampling_masks(logits, seqs, self.eos_token_ids)
        tokens = sampler(processed, steps.to(self.device))
        top = max((s.params.logprobs or 0) for s in seqs) if any(s.params.logprobs is not None for s in seqs) else None
        if top is None:
            return {s.seq_id: SampledToken(t) for s, t in zip(seqs, tokens.tolist())}
        return self._with_logprobs(seqs, logits, tokens, top)

    def _graph_step(self, chunks: list[ScheduledChunk]) -> bool:
        """Decode-only (one generated-token row per sequence) and small enough for a captured graph."""
        return (self.graphs is not None and self.graphs.fits(len(chunks))
                and all(c.length == 1 and c.start >= c.seq.prompt_len for c in chunks))

    def _with_logprobs(self, seqs, logits, tokens, top: int) -> dict:
        logp = logits.log_softmax(-1)
        chosen = logp.gather(1, tokens[:, None])
        rank = (logp > chosen).sum(-1) + 1
        top_values, top_ids = logp.topk(max(top, 1), dim=-1)
        host = [t.tolist() for t in (tokens, chosen[:, 0], rank, top_values, top_ids)]
        results = {}
        for i, seq in enumerate(seqs):
            entry = None
            if seq.params.logprobs is not None:
                n = seq.params.logprobs
                entry = {tid: Logprob(v, r + 1) for r, (tid, v) in enumerate(zip(host[4][i][:n], host[3][i][:n]))}
                entry[host[0][i]] = Logprob(host[1][i], host[2][i])
            results[seq.seq_id] = SampledToken(host[0][i], entry)
        return results

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
