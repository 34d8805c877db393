"""Load on the OpenAI-compatible server: Poisson arrivals at a set rate, at most `concurrency` streams open, for a
set duration (then the streams in flight finish); reports p50 / p99 time to first token, per-token latency after the
first, and throughput (requests/s, generated tokens/s), measured by the client.

    python bench/bench_server.py                       # starts a server in-process (tiny on CPU, smoke)
    python bench/bench_server.py --url http://127.0.0.1:8000 --model dynfocus-smol --rate 2 --duration 30
    python bench/bench_server.py --model dynfocus-7b --random-weights --record   # GPU: in-process 7B server

Every loop is bounded: arrivals stop at the duration, each stream at max_tokens and a per-request timeout.
Rows go to bench/results/server.csv only with --record on a full-size GPU run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import threading
import time

import httpx2 as httpx
import torch

from common import append_csv, device_name, format_table, git_commit, record_allowed, utc_date

COLUMNS = ["model", "rate", "concurrency", "requests", "failed", "requests_per_s", "tokens_per_s", "ttft_p50_ms",
           "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float) -> dict:
    start = time.perf_counter()
    first = last = tokens = None
    chunks = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                return {"ok": False, "status": "stream error"}
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            if any(choice.get("delta", {}).get("content") for choice in payload.get("choices", [])):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                chunks += 1
    end = time.perf_counter()
    first = first if first is not None else end
    tokens = tokens if tokens is not None else chunks  # the usage chunk counts tokens; chunks if it is missing
    return {"ok": True, "ttft_s": first - start, "tokens": tokens,
            "tpot_s": (last - first) / (tokens - 1) if last is not None and tokens > 1 else None,
            "end": end}


async def run_load(url: str, model: str, *, rate: float, concurrency: int, duration_s: float, max_tokens: int,
                   headers: dict, seed: int = 0, timeout_s: float = 300.0) -> dict:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    results, tasks = [], []

    async def request(i: int, client: httpx.AsyncClient):
        async with gate:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": f"Request {i}: describe a sunny day."}]}
            try:
                results.append(await one_stream(client, url, body, timeout_s))
            except (httpx.HTTPError, json.JSONDecodeError) as error:
                results.append({"ok": False, "status": type(error).__name__})

    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=concurrency)) as client:
        i = 0
        while time.perf_counter() - started < duration_s:
            tasks.append(asyncio.create_task(request(i, client)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    tpot = [r["tpot_s"] * 1e3 for r in ok if r["tpot_s"] is not None]
    return {"model": model, "rate": rate, "concurrency": concurrency, "requests": len(results),
            "failed": len(results) - len(ok), "requests_per_s": len(ok) / elapsed,
            "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
            "tpot_p50_ms": percentile(tpot, 0.5), "tpot_p99_ms": percentile(tpot, 0.99),
            "mean_tokens": statistics.mean([r["tokens"] for r in ok]) if ok else float("nan")}


def start_in_process(model: str, random_weights: bool):
    """A server on a free localhost port in this process; returns (url, stop)."""
    import uvicorn

    from dynfocus_infer.core.async_llm import AsyncLLM
    from dynfocus_infer.server import ServerSettings, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = AsyncLLM.from_model(model, random_weights=random_weights)
    app = build_app(engine, ServerSettings(port=port, served_model_name=model))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=60)
        engine.shutdown()

    return f"http://127.0.0.1:{port}", stop


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    parser.add_argument("--model", default=None, help="served model (default: tiny on CPU, dynfocus-7b on GPU)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--rate", type=float, default=None, help="mean arrivals per second")
    parser.add_argument("--concurrency", type=int, default=None, help="streams open at most")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, tiny model (default without a GPU)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/server.csv")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    smoke = args.smoke or (not gpu and args.url is None)
    model = args.model or ("tiny" if smoke else "dynfocus-7b")
    settings = dict(rate=args.rate or (4.0 if smoke else 8.0), concurrency=args.concurrency or (8 if smoke else 32),
                    duration_s=args.duration or (3.0 if smoke else 60.0),
                    max_tokens=args.max_tokens or (8 if smoke else 128))
    stop = None
    url = args.url
    if url is None:
        url, stop = start_in_process(model, args.random_weights or model == "dynfocus-7b")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        row = asyncio.run(run_load(url, model, headers=headers, **settings))
    finally:
        if stop is not None:
            stop()
    rows = [row]
    device = "cuda" if gpu and args.url is None else "cpu"
    print(f"device: {device_name(device) if args.url is None else 'remote server'}; url: {url}")
    print(format_table(rows, COLUMNS))
    if args.record and args.url is None and record_allowed(device, smoke):
        meta = dict(device=device_name(device), commit=git_commit(), date=utc_date(),
                    duration_s=settings["duration_s"], max_tokens=settings["max_tokens"])
        print(f"appended {len(rows)} rows to {append_csv('server', [{**meta, **r} for r in rows])}")
    return rows


if __name__ == "__main__":
    main()
