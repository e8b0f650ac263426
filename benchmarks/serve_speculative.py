"""Speculative decoding in `lmforge serve`: a request's latency and a busy server's throughput, with and without it.

Four `lmforge serve` processes (one torch thread each) serve the same trained char model on loopback:

    plain             no speculation: requests that wait together decode as one batch
    lookup            --prompt-lookup-num-tokens 10 (guesses from the text's last 2-gram)
    draft             --assistant-model DRAFT (a 2-layer, 128-wide model guessing 5 tokens per step)
    draft-when-quiet  the same with --speculative-max-running 2: a request that starts while 2 or more are in
                      generation joins a plain batch instead

The models are benchmarks/speculative_decoding.py's (trained there, or here when --runs has none): a 6-layer,
384-wide GPT-2-style char model and its draft, on the Shakespeare char shards. Prompts are --prompts val passages
of 63 characters, each continued by --new greedy tokens (temperature 0, streamed).

    latency     one request at a time, the servers in turn (order rotated every round): per request, the time to
                its first token and to its last; a stream's tokens/s = new tokens / time to the last token
    throughput  --concurrency requests at once (the prompts in turn) to one server, the servers in turn (--rounds
                rounds, order rotated): all new tokens / wall time (median of rounds). The plain server batches
                them (once its --max-decodes 4 decodes run, later requests gather into batches); a speculative
                one decodes each on its own (draft-when-quiet: the first 2, the others batched as plain's)

Every server's greedy texts are compared with the plain server's (they must be equal). Acceptance (guesses kept /
guesses made) comes from each server's /metrics.

    python benchmarks/serve_speculative.py --json-out benchmarks/results/serve_speculative-cpu-X.json
    python benchmarks/serve_speculative.py --quick     # small models, 2 prompts, 1 round: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from machine import machine, report  # noqa: E402  (benchmarks/machine.py)
from serve_load import Server  # noqa: E402
from speculative_decoding import MODELS, ensure_data, last_val_loss, train  # noqa: E402


LOOKUP, DRAFT_TOKENS, QUIET = 10, 5, 2


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared char dataset (made if missing)")
    p.add_argument("--runs", default="runs/speculative", help="speculative_decoding.py's runs (trained if missing)")
    p.add_argument("--steps", type=int, default=900, help="training steps of each model, when they are trained here")
    p.add_argument("--prompts", type=int, default=6, help="val passages continued")
    p.add_argument("--new", type=int, default=176, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each check (medians are reported)")
    p.add_argument("--concurrency", type=int, default=12, help="requests at once in the throughput check")
    p.add_argument("--quick", action="store_true", help="small models, 2 prompts, 32 tokens, 1 round")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    args.threads, args.max_concurrency, args.max_queue, args.max_decodes = 1, 32, 32, 4  # serve_load.Server's
    if args.quick:
        args.steps, args.prompts, args.new, args.rounds, args.concurrency = 30, 2, 32, 1, 2
    if min(args.steps, args.prompts, args.new, args.rounds, args.concurrency) < 1 or args.new > 176:
        p.error("--steps, --prompts, --new, --rounds and --concurrency must be positive, --new at most 176")
    args.reuse, args.train_threads = True, 0  # speculative_decoding.train: keep runs that exist
    return args


def streamed(url: str, prompt: str, new: int) -> tuple[str, float, float]:
    """One greedy streamed completion: (text, seconds to the first text, seconds to the end)."""
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
    text, first, start = "", None, time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
    return text, first, time.perf_counter() - start


def together(url: str, prompts: list[str], new: int, concurrency: int) -> tuple[list[str], float]:
    """`concurrency` requests sent at once, the prompts in turn, not streamed: (texts, wall seconds)."""
    def one(prompt: str) -> str:
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": new, "temperature": 0},
                       timeout=600)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(one, [prompts[i % len(prompts)] for i in range(concurrency)]))
    return texts, time.perf_counter() - start


def counters(url: str) -> dict[str, int]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^lmforge_(\w+)_total (\d+)$", text, re.M)}


def acceptance(before: dict[str, int], after: dict[str, int]) -> float:
    """Guesses kept / guesses made between two reads of a server's counters."""
    kept = after["speculative_accepted_tokens"] - before["speculative_accepted_tokens"]
    return round(kept / max(1, after["speculative_drafted_tokens"] - before["speculative_drafted_tokens"]), 3)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = Path(args.data)
    ensure_data(data)
    from lmforge.checkpoint import load_for_inference
    from lmforge.data.shards import load_split, read_manifest

    vocab_size = read_manifest(data)["vocab_size"]
    runs = {name: train(name, args, vocab_size) for name in MODELS}
    here = machine()
    _, tokenizer, _ = load_for_inference(runs["target"], "cpu")
    val = load_split(data, "val")
    step = (len(val) - 64) // args.prompts
    prompts = [tokenizer.decode([int(t) for t in val[i * step:i * step + 63]]) for i in range(args.prompts)]

    logs = Path(args.runs) / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    limits = ("--max-tokens", "256", "--max-prompt-tokens", "256", "--timeout", "600")
    ways = {"plain": limits, "lookup": (*limits, "--prompt-lookup-num-tokens", str(LOOKUP)),
            "draft": (*limits, "--assistant-model", str(runs["draft"]), "--num-assistant-tokens", str(DRAFT_TOKENS)),
            "draft-when-quiet": (*limits, "--assistant-model", str(runs["draft"]), "--num-assistant-tokens",
                                 str(DRAFT_TOKENS), "--speculative-max-running", str(QUIET))}
    with ThreadPoolExecutor(len(ways)) as pool:  # they start (import torch, load the models) side by side
        started = {name: pool.submit(Server, runs["target"], args, 32, logs / f"{name}.log", extra)
                   for name, extra in ways.items()}
    servers, failure = {}, None
    for name, future in started.items():
        try:
            servers[name] = future.result()
        except BaseException as e:  # serve_load.Server exits when its server does not come up
            failure = failure or e
    if failure is not None:
        for server in servers.values():  # no server left behind
            server.stop()
        raise failure
    try:
        for name, server in servers.items():  # warm-up: first-call costs out of the timings
            streamed(server.url, prompts[0], 8)
        before = {name: counters(server.url) for name, server in servers.items()}
        first: dict[str, list[float]] = {name: [] for name in servers}
        last: dict[str, list[float]] = {name: [] for name in servers}
        texts: dict[str, list[str]] = {}
        names = list(servers)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out = [streamed(servers[name].url, prompt, args.new) for prompt in prompts]
                texts[name] = [t for t, _, _ in out]
                first[name] += [f for _, f, _ in out]
                last[name] += [s for _, _, s in out]
        after = {name: counters(server.url) for name, server in servers.items()}
        wall: dict[str, list[float]] = {name: [] for name in servers}
        together_texts = {}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                together_texts[name], seconds = together(servers[name].url, prompts, args.new, args.concurrency)
                wall[name].append(seconds)
    finally:
        codes = {name: server.stop() for name, server in servers.items()}

    latency = {name: round(statistics.median(s), 3) for name, s in last.items()}
    stream_tps = {name: round(args.new / latency[name], 1) for name in servers}
    throughput = {name: round(args.new * args.concurrency / statistics.median(s), 1) for name, s in wall.items()}
    summary = {
        "benchmark": "serve_speculative", "machine": here, "data": str(data),
        "val_loss": {name: last_val_loss(path) for name, path in runs.items()},
        "prompts": args.prompts, "prompt_chars": 63, "new_tokens": args.new, "rounds": args.rounds,
        "server_threads": 1, "lookup_tokens": LOOKUP, "draft_tokens": DRAFT_TOKENS, "concurrency": args.concurrency,
        "speculative_max_running": QUIET,
        "latency_s_median": latency,
        "first_token_s_median": {name: round(statistics.median(s), 4) for name, s in first.items()},
        "stream_tokens_per_s": stream_tps,
        "stream_speedup_vs_plain": {name: round(stream_tps[name] / stream_tps["plain"], 3) for name in servers},
        "throughput_tokens_per_s": throughput,
        "throughput_vs_plain": {name: round(throughput[name] / throughput["plain"], 3) for name in servers},
        "acceptance": {name: acceptance(before[name], after[name]) for name in servers if name != "plain"},
        "greedy_texts_equal_plain": {name: texts[name] == texts["plain"] and together_texts[name] == [
            texts["plain"][i % args.prompts] for i in range(args.concurrency)] for name in servers},
        "server_exit_codes": codes,
        "sample_text": prompts[0] + texts["plain"][0],
    }
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
