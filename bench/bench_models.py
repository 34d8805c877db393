"""Model throughput with random weights (DESIGN.md sections 6 and 9): EVA ViT-g/14 frames/s, and the prefill and
KV-cached decode of a LLaMA-7B-shaped decoder (Vicuna-7B v1.5 sizes), against the device's measured ceilings.

    python bench/bench_models.py              # GPU: paper sizes in bf16, prints a table
    python bench/bench_models.py --record     # also appends rows to bench/results/models.csv
    python bench/bench_models.py --smoke      # tiny configs in fp32 (the default on a CPU); writes nothing

FLOPs are counted analytically from the config (matmuls only; norms, activations and softmax are elementwise):
ViT per frame = patch conv 2 * grid^2 * 3 p^2 * d + depth * (2 n (4 d^2 + 2 d m) + 4 n^2 d), n = grid^2 + 1 tokens.
LLaMA prefill of S tokens = 2 S * (linear weights per layer) * layers + causal attention 4 H D * S (S + 1) / 2 per
layer + the LM head of the last row. Decode reads every weight once per token (the embedding table: one row) plus
the K/V of the cache length it attends to; `bw_ratio` = time / (weight bytes / measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ceilings import measure_ceilings
from common import append_csv, device_name, format_table, git_commit, record_allowed, time_ms, utc_date
from dynfocus_infer.config import LlamaConfig, ViTConfig
from dynfocus_infer.models.eva_vit import EvaViT
from dynfocus_infer.models.llama import KVCache, LlamaForCausalLM

COLUMNS = ["case", "shape", "ms", "per_s", "gflop", "tflops", "matmul_frac", "gbps", "bw_ratio"]
NAN = float("nan")
# --smoke: tiny sizes that still exercise GQA (4 query heads share 2 KV heads) and a multi-patch image.
SMOKE_VIT = ViTConfig(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128)
SMOKE_LLAMA = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                          num_kv_heads=2)
SMOKE_VIT_BATCH, SMOKE_PROMPT_LEN, SMOKE_DECODE_STEPS = 4, 24, 4


def vit_flops_per_frame(config: ViTConfig) -> int:
    d, m, n = config.width, config.mlp_dim, config.num_tokens
    patch_embed = 2 * config.grid ** 2 * 3 * config.patch_size ** 2 * d
    return patch_embed + config.depth * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)


def llama_layer_weights(config: LlamaConfig) -> int:
    """Weights of the matmuls of one decoder layer: q, k, v, o projections and the SwiGLU MLP."""
    d, q_width, kv_width = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return d * q_width + 2 * d * kv_width + q_width * d + 3 * d * config.intermediate_size


def llama_prefill_flops(config: LlamaConfig, seq_len: int) -> int:
    attention = 4 * config.num_heads * config.head_dim * seq_len * (seq_len + 1) // 2
    lm_head = 2 * config.hidden_size * config.vocab_size
    return config.num_layers * (2 * seq_len * llama_layer_weights(config) + attention) + lm_head


def llama_decode_work(config: LlamaConfig, cache_len: float, itemsize: int) -> tuple[float, int, float]:
    """(flops, weight bytes, KV bytes) of one decode step attending to `cache_len` positions (the new one included)."""
    d, layers = config.hidden_size, config.num_layers
    norms = (2 * layers + 1) * d
    embedding_read = d if not config.tie_word_embeddings else 0  # tied: the head already reads the whole table
    weight_bytes = (layers * llama_layer_weights(config) + config.vocab_size * d + norms + embedding_read) * itemsize
    kv_width = config.num_kv_heads * config.head_dim
    kv_bytes = layers * 2 * cache_len * kv_width * itemsize
    flops = 2 * (layers * llama_layer_weights(config) + config.vocab_size * d) \
        + layers * 4 * config.num_heads * config.head_dim * cache_len
    return flops, weight_bytes, kv_bytes


@torch.no_grad()
def random_model(build, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Builds on the meta device, then allocates straight in `dtype` on `device` (no fp32 copy of a 7B model on
    the host) and fills cheap random weights: N(0, 0.02), norm scales 1. Values only matter for keeping clocks and
    activations realistic (all-zero weights draw less power and can run faster)."""
    with torch.device("meta"):
        model = build()
    model = model.to(dtype=dtype).to_empty(device=device).eval()
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)
    return model


def bench_vit(config, batch, device, dtype, repeats):
    vit = random_model(lambda: EvaViT(config), device, dtype)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    ms = time_ms(lambda: vit(pixels), device, warmup=2, repeats=repeats, calls_per_repeat=1)
    flops = batch * vit_flops_per_frame(config)
    print(f"ViT FLOPs per frame (analytic): {vit_flops_per_frame(config) / 1e9:.4g} GFLOP")
    return dict(case="vit", shape=f"{batch}x3x{config.image_size}^2 d{config.width} L{config.depth}", ms=ms,
                per_s=batch / ms * 1e3, gflop=flops / 1e9, tflops=flops / ms / 1e9, gbps=NAN, bw_ratio=NAN)


def capture_decode_graph(model, cache, token):
    """One decode step (argmax fed back into `token`) captured as a CUDA graph; max_cache_len=None keeps every
    shape fixed across steps (the SDPA path then reads the whole cache, masked; flash_attn reads cache_lens)."""
    def step():
        token.copy_(model.decode(cache, input_ids=token).argmax(-1))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def bench_llama(config, prompt_len, steps, device, dtype, repeats, use_graph):
    itemsize = torch.finfo(dtype).bits // 8
    max_seq = prompt_len + steps
    tables = 1 if config.tie_word_embeddings else 2  # embedding (+ untied LM head)
    total_bytes = (config.num_layers * (llama_layer_weights(config) + 2 * config.hidden_size) + config.hidden_size
                   + tables * config.vocab_size * config.hidden_size) * itemsize
    cache_bytes = llama_decode_work(config, max_seq, itemsize)[2]
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if total_bytes + cache_bytes + 2 ** 31 > free:
            print(f"LLaMA ({config.num_layers} layers, width {config.hidden_size}) needs "
                  f"{(total_bytes + cache_bytes) / 1e9:.1f} GB of weights + KV cache in {dtype} plus ~2 GB of "
                  f"activations; {free / 1e9:.1f} GB free: does not fit, skipped")
            return []
    model = random_model(lambda: LlamaForCausalLM(config), device, dtype)
    cache = KVCache.for_model(config, 1, max_seq, dtype, device)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), device=device)
    cu_seqlens = torch.tensor([0, prompt_len], dtype=torch.int32, device=device)
    token = model.prefill(cu_seqlens, prompt_len, input_ids=prompt, cache=cache).argmax(-1)
    prefill_ms = time_ms(lambda: model.prefill(cu_seqlens, prompt_len, input_ids=prompt, cache=cache), device,
                         warmup=2, repeats=repeats, calls_per_repeat=1)
    prefill_flops = llama_prefill_flops(config, prompt_len)
    shape = f"1x{prompt_len} d{config.hidden_size} L{config.num_layers}"
    rows = [dict(case="prefill", shape=shape, ms=prefill_ms, per_s=prompt_len / prefill_ms * 1e3,
                 gflop=prefill_flops / 1e9, tflops=prefill_flops / prefill_ms / 1e9, gbps=NAN, bw_ratio=NAN)]

    def eager_steps():
        cache.lengths.fill_(prompt_len)  # a device-side reset: the timed loop below never syncs with the host
        next_token = token
        for step in range(steps):
            next_token = model.decode(cache, input_ids=next_token, max_cache_len=prompt_len + step + 1).argmax(-1)

    decoders = [("decode", eager_steps)]
    if use_graph and device.type == "cuda":
        static_token = token.clone()
        try:
            graph = capture_decode_graph(model, cache, static_token)
        except RuntimeError as error:  # a decode path that cannot be captured is reported, not fatal
            print(f"CUDA-graph capture of decode failed: {error}", file=sys.stderr)
        else:
            def graph_steps():
                cache.lengths.fill_(prompt_len)
                static_token.copy_(token)
                for _ in range(steps):
                    graph.replay()
            decoders.append(("decode+graph", graph_steps))
    flops, weight_bytes, kv_bytes = llama_decode_work(config, prompt_len + (steps + 1) / 2, itemsize)
    for case, run_steps in decoders:
        ms = time_ms(run_steps, device, warmup=2, repeats=repeats, calls_per_repeat=1) / steps
        rows.append(dict(case=case, shape=f"{shape} +{steps} steps", ms=ms, per_s=1e3 / ms, gflop=flops / 1e9,
                         tflops=flops / ms / 1e9, gbps=(weight_bytes + kv_bytes) / ms / 1e6,
                         weight_bytes=weight_bytes))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configs in fp32 (the default on a CPU)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/models.csv")
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1200)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    if smoke:
        vit_config, llama_config, dtype, repeats = SMOKE_VIT, SMOKE_LLAMA, torch.float32, 1
        vit_batch, prompt_len, steps = SMOKE_VIT_BATCH, SMOKE_PROMPT_LEN, SMOKE_DECODE_STEPS
    else:
        vit_config, llama_config = ViTConfig(), LlamaConfig()
        dtype, vit_batch, prompt_len, steps = torch.bfloat16, args.vit_batch, args.prompt_len, args.decode_steps
        repeats = args.repeats
    torch.manual_seed(0)
    with torch.inference_mode():
        rows = [bench_vit(vit_config, vit_batch, device, dtype, repeats)]
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the ViT is gone; give its memory to the 7B model
        rows += bench_llama(llama_config, prompt_len, steps, device, dtype, repeats, not args.no_graph)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ceilings = measure_ceilings(device)
    for row in rows:
        row["matmul_frac"] = row["tflops"] / ceilings["matmul_tflops"]
        weight_bytes = row.pop("weight_bytes", None)
        if weight_bytes is not None:
            row["bw_ratio"] = row["ms"] / (weight_bytes / ceilings["copy_gbps"] / 1e6)
    print(f"device: {device_name(device)}; {dtype}; measured ceilings: {ceilings['matmul_tflops']:.3g} TFLOP/s "
          f"matmul, {ceilings['copy_gbps']:.3g} GB/s copy")
    print(format_table(rows, COLUMNS))
    if args.record and record_allowed(device, smoke):
        meta = dict(device=device_name(device), commit=git_commit(), date=utc_date(), dtype=str(dtype),
                    ceiling_tflops=round(ceilings["matmul_tflops"], 1), ceiling_gbps=round(ceilings["copy_gbps"]))
        path = append_csv("models", [{**meta, **{c: row[c] for c in COLUMNS}} for row in rows])
        print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
