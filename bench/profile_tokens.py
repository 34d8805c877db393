"""Throughput profile of DynFocus against token-count baselines (dynfocus_infer.models.baselines), run through the
same model parts: EVA ViT -> Q-Former -> visual encoder -> LLaMA prefill + KV-cached decode.

    python bench/profile_tokens.py              # GPU: dynfocus-7b sizes, random weights, bf16; prints a table
    python bench/profile_tokens.py --record     # also appends rows to bench/results/profile_tokens.csv
    python bench/profile_tokens.py --smoke      # the "tiny" preset in fp32 (the default on a CPU); records nothing
    python bench/profile_tokens.py --counts     # exact token and KV-cache budgets at dynfocus-7b sizes, no device
                                                # (--record: bench/results/token_counts.csv, any machine)
    python bench/plots.py                       # PNGs from the CSVs

One row per (baseline, T frames, batch of identical-length videos), all quantities for the whole batch:
- visual_tokens / prompt_tokens: per video (prompt = template text + visual tokens); `context` is the LLM context.
  A prompt that cannot hold the answer (prompt + answer_tokens > context) gets status "exceeds context" and no LLM
  timings: it is reported, never truncated. A batch that runs out of GPU memory gets "out of memory".
- vit_ms, qformer_ms: per-frame costs measured once on a chunk of frames (the engine encodes frames in chunks, so
  the cost is linear in frames) times the frames the encoder reads (uniform-K reads K) and, for encoders that use
  the question (LLaMA-VID, DynFocus), the Q-Former over every frame.
- connector_ms, prefill_ms (packed prefill + first-token argmax), decode_ms_per_token (one step of the whole batch,
  `decode_steps` steps timed with no host sync), all medians of `repeats` runs.
- ttft_ms: vit + qformer + connector + prefill, stages back to back; videos_per_s: batch / (ttft + (answer_tokens
  - 1) * decode_ms_per_token).
- kv_cache_mb: exact, layers x 2 x kv_heads x head_dim x bytes x (prompt + answer_tokens) x batch, MB = 2^20 bytes.
- peak_mem_mb (CUDA): peak allocated during the case's encoder, prefill and decode, weights and features included.
--counts runs no model (the dynfocus-7b shapes are built on the meta device): visual_tokens, prompt_tokens, status
and kv_cache_mb depend on sizes alone, so they are exact on any machine. The random 7B build has no trained
vocabulary and tokenizes text as UTF-8 bytes, so its prompt text (template + question) counts more tokens than
Vicuna's tokenizer would; visual tokens do not depend on it.
Frames are synthetic random pixels: decoding is not profiled, and every video of a batch is the same video (the
encoders' work does not depend on pixel values). Weights are random (no DynFocus checkpoint has been published).
"""
from __future__ import annotations

import argparse
import traceback
from typing import Callable

import torch

from common import append_csv, device_name, format_table, git_commit, record_allowed, time_ms, utc_date
from dynfocus_infer.models.baselines import DYNFOCUS_GRID, build_baselines
from dynfocus_infer.models.llama import KVCache
from dynfocus_infer.presets import load_model
from dynfocus_infer.prompt import render_prompt, tokenize_prompt

COLUMNS = ["baseline", "frames", "batch", "status", "visual_tokens", "prompt_tokens", "context", "vit_ms",
           "qformer_ms", "connector_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "kv_cache_mb",
           "peak_mem_mb", "videos_per_s"]
PRINTED = ["baseline", "frames", "batch", "status", "visual_tokens", "connector_ms", "prefill_ms", "ttft_ms",
           "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb", "videos_per_s"]
QUESTION = "What happens in this video, and in what order?"
NAN = float("nan")
OK, EXCEEDS_CONTEXT, OUT_OF_MEMORY = "ok", "exceeds context", "out of memory"
FULL = dict(model="dynfocus-7b", frames=(16, 32, 64, 200), batches=(1, 8, 32), answer_tokens=64, decode_steps=16,
            repeats=3, vit_chunk=64)
SMOKE = dict(model="tiny", frames=(6, 12, 30), batches=(1, 2, 4), answer_tokens=8, decode_steps=4, repeats=1,
             vit_chunk=8)
COUNTS = dict(model="dynfocus-7b", frames=(8, 16, 32, 64, 128, 200, 400), batches=(1,), answer_tokens=64)
COUNT_COLUMNS = ["baseline", "frames", "batch", "status", "visual_tokens", "prompt_tokens", "context", "kv_cache_mb"]


def kv_cache_mb(llm_config, seq_len: int, batch: int, itemsize: int) -> float:
    """Exact K/V bytes of `batch` sequences of `seq_len` positions, in MB (2^20 bytes)."""
    per_position = llm_config.num_layers * 2 * llm_config.num_kv_heads * llm_config.head_dim * itemsize
    return per_position * seq_len * batch / 2 ** 20


def text_token_count(loaded) -> int:
    """Tokens of the prompt around the visual tokens: the model's template with QUESTION (BOS included)."""
    text = render_prompt(loaded.template, QUESTION, True, loaded.tokenizer)
    return len(tokenize_prompt(loaded.tokenizer, text, add_bos=loaded.add_bos))


def budget_row(encoder, num_frames: int, batch: int, *, text_tokens: int, context: int, llm_config,
               itemsize: int, answer_tokens: int) -> dict:
    """The size columns of a case (COUNT_COLUMNS): exact, from shapes alone."""
    visual = encoder.count_tokens(num_frames)
    prompt = text_tokens + visual
    status = EXCEEDS_CONTEXT if prompt + answer_tokens > context else OK
    return dict(baseline=encoder.name, frames=num_frames, batch=batch, status=status, visual_tokens=visual,
                prompt_tokens=prompt, context=context,
                kv_cache_mb=kv_cache_mb(llm_config, prompt + answer_tokens, batch, itemsize))


class Profiler:
    """The model, its prompt pieces and one synthetic video's features, shared by every case."""

    def __init__(self, loaded, device: torch.device, settings: dict, context: int | None):
        self.loaded, self.model, self.device, self.settings = loaded, loaded.model, device, settings
        self.llm = self.model.llm
        self.dtype = self.llm.model.embed_tokens.weight.dtype
        self.context = context or loaded.context_length
        text = render_prompt(loaded.template, QUESTION, True, loaded.tokenizer)
        parts = tokenize_prompt(loaded.tokenizer, text, add_bos=loaded.add_bos)
        self.text_tokens = len(parts)
        with torch.inference_mode():
            self.before = self.llm.embed(torch.tensor(parts.before, device=device))[None]
            self.after = self.llm.embed(torch.tensor(parts.after, device=device))[None]
        self.question = loaded.question_tokenizer([QUESTION], device)
        self._encode_video(max(settings["frames"]))

    def _time(self, fn, warmup: int = 1) -> float:
        return time_ms(fn, self.device, warmup=warmup, repeats=self.settings["repeats"], calls_per_repeat=1)

    @torch.inference_mode()
    def _encode_video(self, num_frames: int) -> None:
        """ViT tokens and q_emb of one synthetic video, and the per-frame ViT and Q-Former costs."""
        vit_config, chunk = self.model.config.vit, self.settings["vit_chunk"]
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(num_frames, 3, vit_config.image_size, vit_config.image_size, generator=generator)
        pixels = pixels.to(self.device, self.dtype)
        self.frame_tokens = self.model.vit(pixels, chunk_size=chunk)
        self.q_emb = self._qformer(self.frame_tokens)
        probe = min(chunk, num_frames)
        self.vit_ms_per_frame = self._time(lambda: self.model.vit(pixels[:probe])) / probe
        self.qformer_ms_per_frame = self._time(lambda: self._qformer(self.frame_tokens[:probe])) / probe

    def _qformer(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = self.question
        one_question = torch.zeros(frame_tokens.shape[0], dtype=torch.int64, device=self.device)
        return self.model.qformer(frame_tokens, ids, mask, one_question).to(frame_tokens.dtype)

    def batch_inputs(self, num_frames: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens [batch * T, g^2, C] and q_emb [batch * T, 32, C]: the first T frames, `batch` times."""
        patches = self.frame_tokens[:num_frames, 1:].repeat(batch, 1, 1)
        return patches, self.q_emb[:num_frames].repeat(batch, 1, 1)

    @torch.inference_mode()
    def case(self, encoder, num_frames: int, batch: int, patches: torch.Tensor, q_emb: torch.Tensor) -> dict:
        settings, on_gpu = self.settings, self.device.type == "cuda"
        sizes = budget_row(encoder, num_frames, batch, text_tokens=self.text_tokens, context=self.context,
                           llm_config=self.llm.config, itemsize=torch.finfo(self.dtype).bits // 8,
                           answer_tokens=settings["answer_tokens"])
        row = dict(sizes, vit_ms=self.vit_ms_per_frame * batch * encoder.frames_read(num_frames),
                   qformer_ms=self.qformer_ms_per_frame * batch * num_frames if encoder.uses_qformer else 0.0,
                   connector_ms=NAN, prefill_ms=NAN, ttft_ms=NAN, decode_ms_per_token=NAN, peak_mem_mb=NAN,
                   videos_per_s=NAN)
        row = {column: row[column] for column in COLUMNS}
        if on_gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self._run(encoder, num_frames, batch, patches, q_emb if encoder.uses_qformer else None, row)
        except torch.cuda.OutOfMemoryError:
            if row["status"] == OK:  # a prompt over the context stays reported as such
                row["status"] = OUT_OF_MEMORY
        except Exception as error:  # one broken case is reported in its row; the others still run
            traceback.print_exc()
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        if on_gpu:
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            torch.cuda.empty_cache()
        return row

    def _prompt_embeds(self, visual_tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """Packed prompts [batch * prompt, hidden]: template text with each video's visual tokens spliced in."""
        visual = visual_tokens.view(batch, -1, visual_tokens.shape[-1]).to(self.dtype)
        text = (self.before.expand(batch, -1, -1), visual, self.after.expand(batch, -1, -1))
        return torch.cat(text, dim=1).flatten(0, 1)

    def _run(self, encoder, num_frames, batch, patches, q_emb, row) -> None:
        frames = [num_frames] * batch
        out = encoder(patches, q_emb, frames, check=False)
        if set(out.num_tokens) != {row["visual_tokens"]}:
            raise AssertionError(f"{encoder.name}: emitted {sorted(set(out.num_tokens))} tokens per video of "
                                 f"{num_frames} frames, count_tokens says {row['visual_tokens']}")
        embeds = self._prompt_embeds(out.tokens, batch) if row["status"] == OK else None
        del out  # before timing: a second output of the large baselines may not fit beside it
        row["connector_ms"] = self._time(lambda: encoder(patches, q_emb, frames, check=False), warmup=0)  # ran above
        if embeds is None:
            return
        answer, prompt = self.settings["answer_tokens"], row["prompt_tokens"]
        steps = max(1, min(self.settings["decode_steps"], answer - 1))
        cache = KVCache.for_model(self.llm.config, batch, prompt + steps + 1, self.dtype, self.device)
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=self.device) * prompt

        def prefill():
            return self.llm.prefill(cu_seqlens, prompt, inputs_embeds=embeds, cache=cache).argmax(-1)

        first_token = prefill()
        row["prefill_ms"] = self._time(prefill, warmup=0)  # warmed by the first call

        def decode():
            cache.lengths.fill_(prompt)  # on the device: the timed steps never wait for the host
            token = first_token
            for step in range(steps):
                token = self.llm.decode(cache, input_ids=token, max_cache_len=prompt + step + 1).argmax(-1)

        row["decode_ms_per_token"] = self._time(decode) / steps
        row["ttft_ms"] = row["vit_ms"] + row["qformer_ms"] + row["connector_ms"] + row["prefill_ms"]
        batch_ms = row["ttft_ms"] + (answer - 1) * row["decode_ms_per_token"]
        row["videos_per_s"] = batch / batch_ms * 1e3


def profile(profiler: Profiler, encoders: dict, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every (T, batch, baseline) case; each batch's features are built once and shared by the baselines.
    `on_row` sees each row as soon as its case ends (the recorder appends it then: a run cut short keeps them)."""
    rows = []
    for num_frames in profiler.settings["frames"]:
        for batch in profiler.settings["batches"]:
            patches, q_emb = profiler.batch_inputs(num_frames, batch)
            for encoder in encoders.values():
                rows.append(profiler.case(encoder, num_frames, batch, patches, q_emb))
                on_row(rows[-1])
            del patches, q_emb
    return rows


def row_recorder(run: dict) -> Callable[[dict], None]:
    """profile()'s on_row for --record: appends each row to bench/results/profile_tokens.csv as its case ends,
    after the run's columns (device, model, dtype, answer_tokens) and the commit and date."""
    meta = dict(device=run["device"], commit=git_commit(), date=utc_date(), model=run["model"], dtype=run["dtype"],
                answer_tokens=run["answer_tokens"])

    def record(row: dict) -> None:
        path = append_csv("profile_tokens", [{**meta, **{c: row[c] for c in COLUMNS}}])
        print(f"{row['baseline']} T={row['frames']} batch={row['batch']}: {row['status']} -> {path.name}", flush=True)

    return record


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset in fp32, quick (the default on a CPU)")
    parser.add_argument("--counts", action="store_true",
                        help="exact token and KV-cache budgets only (no model run, any machine; default frames "
                             f"{' '.join(map(str, COUNTS['frames']))}, batch 1)")
    parser.add_argument("--record", action="store_true",
                        help="append rows to bench/results/profile_tokens.csv (--counts: token_counts.csv)")
    parser.add_argument("--model", help=f"preset (default {FULL['model']}; smoke: {SMOKE['model']})")
    parser.add_argument("--frames", type=int, nargs="+", help="T values (default 16 32 64 200)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8 32)")
    parser.add_argument("--baselines", nargs="+", help="only these baselines (names as in the table)")
    parser.add_argument("--uniform-frames", type=int, nargs="+", default=[8], help="K of the uniform-K baselines")
    parser.add_argument("--context", type=int, help="treat the LLM context as this many tokens (default: the model's)")
    parser.add_argument("--answer-tokens", type=int, help="answer length for videos/s and the KV cache (default 64)")
    parser.add_argument("--decode-steps", type=int, help="decode steps timed per case (default 16)")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    for name in ("frames", "batches", "uniform_frames"):
        values = getattr(args, name) or []
        if any(v < 1 for v in values):
            parser.error(f"--{name.replace('_', '-')} values must be >= 1, got {values}")
    if args.answer_tokens is not None and args.answer_tokens < 2:
        parser.error("--answer-tokens must be >= 2 (the first token comes from the prefill)")
    if args.counts and args.smoke:
        parser.error("--counts and --smoke exclude each other")
    return args


def select_baselines(connector, args) -> dict:
    encoders = build_baselines(connector, uniform_frames=args.uniform_frames, dynfocus_grid=DYNFOCUS_GRID)
    if args.baselines:
        unknown = sorted(set(args.baselines) - set(encoders))
        if unknown:
            raise SystemExit(f"unknown baselines {unknown}: choose from {sorted(encoders)}")
        encoders = {name: encoders[name] for name in args.baselines}
    return encoders


def count_budgets(args) -> list[dict]:
    """--counts: the size columns of every (baseline, T, batch) at the preset's shapes, built on the meta device
    (no weights, no device, no time): exact wherever it runs."""
    settings = dict(COUNTS)
    overrides = dict(model=args.model, frames=args.frames, batches=args.batches, answer_tokens=args.answer_tokens)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    dtype = torch.bfloat16
    loaded = load_model(settings["model"], device="meta", dtype=dtype, cluster_backend="reference",
                        random_weights=settings["model"] == "dynfocus-7b")
    encoders = select_baselines(loaded.model.connector, args)
    text_tokens, context = text_token_count(loaded), args.context or loaded.context_length
    rows = [budget_row(encoder, num_frames, batch, text_tokens=text_tokens, context=context,
                       llm_config=loaded.model.config.llm, itemsize=torch.finfo(dtype).bits // 8,
                       answer_tokens=settings["answer_tokens"])
            for num_frames in settings["frames"] for batch in settings["batches"] for encoder in encoders.values()]
    print(f"exact budgets (no device): model {settings['model']} ({dtype}); context {context}; prompt text "
          f"{text_tokens} tokens; answer {settings['answer_tokens']} tokens in the KV cache")
    print(format_table(rows, COUNT_COLUMNS))
    if args.record:
        meta = dict(device="none (exact counts)", commit=git_commit(), date=utc_date(), model=settings["model"],
                    dtype=str(dtype).replace("torch.", ""), answer_tokens=settings["answer_tokens"])
        path = append_csv("token_counts", [{**meta, **row} for row in rows])
        print(f"appended {len(rows)} rows to {path}")
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.counts:
        return count_budgets(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    settings = dict(SMOKE if smoke else FULL)
    overrides = dict(model=args.model, frames=args.frames, batches=args.batches, answer_tokens=args.answer_tokens,
                     decode_steps=args.decode_steps, repeats=args.repeats)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        # Tiny ops: intra-op thread wake-ups cost more than the work, and oversubscribe a shared machine.
        torch.set_num_threads(1)
    # On a CPU the plain-torch clustering: the Triton interpreter checks kernels, it is no thing to profile.
    backend = "auto" if device.type == "cuda" else "reference"
    loaded = load_model(settings["model"], device=device, dtype=dtype, cluster_backend=backend,
                        random_weights=settings["model"] == "dynfocus-7b")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    encoders = select_baselines(loaded.model.connector, args)
    profiler = Profiler(loaded, device, settings, args.context)
    print(f"device: {device_name(device)}; model {settings['model']} ({dtype}, random weights); context "
          f"{profiler.context}; answer {settings['answer_tokens']} tokens; ViT {profiler.vit_ms_per_frame:.4g} "
          f"ms/frame, Q-Former {profiler.qformer_ms_per_frame:.4g} ms/frame", flush=True)
    on_row = lambda row: print(format_table([row], PRINTED).splitlines()[1], flush=True)  # noqa: E731
    if args.record and record_allowed(device, smoke):
        on_row = row_recorder(dict(device=device_name(device), model=settings["model"],
                                   dtype=str(dtype).replace("torch.", ""), answer_tokens=settings["answer_tokens"]))
    rows = profile(profiler, encoders, on_row)
    print(format_table(rows, PRINTED))
    return rows


if __name__ == "__main__":
    main()
