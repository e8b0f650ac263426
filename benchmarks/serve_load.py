"""Load test of `lmforge serve` on loopback: 1000 requests, valid and not, with bounded client concurrency.

Starts `lmforge serve` in a process of its own (a tiny random model with the byte tokenizer unless
--checkpoint is given), then sends --requests requests from --concurrency clients at once:
    valid      non-streaming completions (prompts of 1 to 120 characters, max_tokens 8 to 32, some n=2)
    stream     streaming completions, read to `data: [DONE]`
    oversize   a 20 kB body (-> 413)
    invalid    an unknown field, a max_tokens over the cap, malformed JSON, a prompt over the cap (-> 422)
More clients than the server's --max-concurrency + --max-queue, so some answers are 429 (with Retry-After).
Every answer must be 200, 413, 422 or 429: the script exits 1 on any other (a 5xx), or if the server
died or its memory grew by more than --max-rss-growth-mb (RSS before the run, after a warm-up, and after;
then the same load again, whose RSS growth shows whether memory keeps growing).

Then the hostile-client check: --hostile-requests well-behaved requests (max_tokens 16) from
--polite-concurrency clients against a server with --max-tokens 4096 and --stall-timeout, first alone, then
with --stalled-readers streams (a list of 4 prompts, n=8, max_tokens 4096, never read; all from 127.0.0.2) and
--slow-connections connections that send nothing, half their headers or half their body: p50/p99 latency of
the well-behaved requests in both phases, whether the stalled generations were cancelled and the slow
connections closed.

Then the micro-batching check: the same --batch-requests valid non-streaming requests (max_tokens 32) from
--max-concurrency clients against the server as configured and against one started with --max-batch-size 1
(no batching), in alternating rounds: completed requests per second of both (medians), and their ratio. One JSON summary at the end: statuses, p50/p99 latency, throughput, rejects, RSS.

    python benchmarks/serve_load.py                     # ~1-2 minutes on 2 busy cores
    python benchmarks/serve_load.py --requests 200      # a quick check that it runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

ALLOWED = {200, 413, 422, 429}
WORDS = ("ROMEO: ", "JULIET: ", "What light ", "through yonder window ", "breaks? ", "It is the east, ",
         "and Juliet is the sun. ", "Arise, fair sun, ", "and kill the envious moon. ")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="run or checkpoint directory (default: a tiny random model)")
    p.add_argument("--requests", type=int, default=1000, help="requests in the mixed load (default: 1000)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default: 64)")
    p.add_argument("--max-concurrency", type=int, default=16, help="the server's --max-concurrency")
    p.add_argument("--max-queue", type=int, default=24, help="the server's --max-queue")
    p.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    p.add_argument("--max-decodes", type=int, default=4, help="the server's --max-decodes")
    p.add_argument("--batch-requests", type=int, default=200, help="requests per round of the batching check; 0 = skip")
    p.add_argument("--batch-rounds", type=int, default=3, help="alternating rounds of the batching check (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: 1)")
    p.add_argument("--max-rss-growth-mb", type=float, default=200.0, help="fail if RSS grows more (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--again", type=int, default=1, help="1: send the whole load a second time (RSS after both)")
    p.add_argument("--hostile-requests", type=int, default=100, help="requests per phase of the hostile check; 0 = skip")
    p.add_argument("--polite-concurrency", type=int, default=4, help="well-behaved clients in the hostile check")
    p.add_argument("--stalled-readers", type=int, default=4, help="streams that never read (hostile check)")
    p.add_argument("--slow-connections", type=int, default=24, help="connections that stall their request")
    p.add_argument("--stall-timeout", type=float, default=2.0, help="the hostile check server's --stall-timeout")
    p.add_argument("--json-out", help="also write the JSON summary to this file")
    return p.parse_args(argv)


def tiny_checkpoint(root: Path) -> Path:
    """A random 4-layer, 128-wide model with the byte tokenizer and a 256-token context."""
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig, RunConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128))
    save_checkpoint(root / "run", 1, model, None, RunConfig(model=model.config), {},
                    tokenizer_file=root / "tokenizer.json")
    return root / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace, max_batch_size: int, log: Path,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(checkpoint), "--port", str(self.port),
               "--device", "cpu", "--threads", str(args.threads), "--log-level", "warning",
               "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue),
               "--max-batch-size", str(max_batch_size), "--max-decodes", str(args.max_decodes), "--max-tokens", "64", "--max-body-bytes", "16384",
               "--max-prompt-tokens", "200", "--timeout", "120",
               # the mixed load comes from one address: let it use every place (the hostile check sets its own)
               "--max-slots-per-client", str(args.max_concurrency + args.max_queue), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"lmforge serve exited with {self.proc.returncode}: see {log}")
            if time.monotonic() > deadline:
                raise SystemExit("lmforge serve did not start in 120 s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


def make_requests(n: int, rng: random.Random) -> list[tuple[str, dict]]:
    """(kind, request) pairs: 65% valid, 15% stream, 10% oversize, 10% invalid, shuffled."""
    def prompt() -> str:
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        return text[:rng.randint(1, 120)]

    def valid() -> dict:
        body = {"prompt": prompt(), "max_tokens": rng.randint(8, 32)}
        if rng.random() < 0.2:
            body["n"] = 2
        if rng.random() < 0.3:
            body["seed"] = rng.randint(0, 1000)
        return {"json": body}

    invalid = [{"json": {"prompt": "x", "max_tokens": 8, "logprobs": 3}},
               {"json": {"prompt": "x", "max_tokens": 65}},
               {"content": b'{"prompt": "x", "max_tokens": ', "headers": {"Content-Type": "application/json"}},
               {"json": {"prompt": "y" * 300, "max_tokens": 8}}]
    out = []
    for i in range(n):
        u = i / n
        if u < 0.65:
            out.append(("valid", valid()))
        elif u < 0.80:
            req = valid()
            req["json"]["stream"] = True
            out.append(("stream", req))
        elif u < 0.90:
            out.append(("oversize", {"json": {"prompt": "z" * 20_000, "max_tokens": 8}}))
        else:
            out.append(("invalid", rng.choice(invalid)))
    rng.shuffle(out)
    return out


async def send(client: httpx.AsyncClient, kind: str, req: dict) -> tuple[str, int, float, int]:
    """(kind, status, seconds, completion tokens or text pieces) of one request; status 0 = no answer."""
    start = time.perf_counter()
    try:
        if kind == "stream":
            async with client.stream("POST", "/v1/completions", **req) as r:
                pieces = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        pieces += 1
                        if '"error"' in line:
                            return kind, 500, time.perf_counter() - start, pieces  # an error inside the stream
                return kind, r.status_code, time.perf_counter() - start, pieces
        r = await client.post("/v1/completions", **req)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
        return kind, r.status_code, time.perf_counter() - start, tokens
    except (httpx.TransportError, AssertionError) as e:
        print(f"no answer: {kind}: {type(e).__name__}: {e}", file=sys.stderr)
        return kind, 0, time.perf_counter() - start, 0


async def run_load(url: str, requests: list[tuple[str, dict]], concurrency: int) -> tuple[list, float]:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as client:
        async def one(kind: str, req: dict):
            async with limit:
                return await send(client, kind, req)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(k, r) for k, r in requests))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def summarize(results: list, seconds: float) -> dict:
    statuses: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        by_kind.setdefault(kind, {})
        by_kind[kind][str(status)] = by_kind[kind].get(str(status), 0) + 1
    ok = [r for r in results if r[1] == 200]
    generated = [r for r in ok if r[0] in ("valid", "stream")]
    return {"requests": len(results), "seconds": round(seconds, 2), "statuses": statuses, "by_kind": by_kind,
            "unexpected": sum(n for s, n in statuses.items() if int(s) not in ALLOWED),
            "rejected_429": statuses.get("429", 0),
            "latency_ms_200": {"p50": percentile([r[2] for r in ok], 0.5), "p99": percentile([r[2] for r in ok], 0.99)},
            "latency_ms_all": {"p50": percentile([r[2] for r in results], 0.5),
                               "p99": percentile([r[2] for r in results], 0.99)},
            "throughput_requests_per_s": round(len(results) / seconds, 1),
            "completions_per_s": round(len(generated) / seconds, 1),
            "completion_tokens_per_s": round(sum(r[3] for r in generated if r[0] == "valid") / seconds, 1)}


def hostile_sockets(url: str, args: argparse.Namespace) -> tuple[list[socket.socket], list[socket.socket]]:
    """(stalled readers, slow connections): raw sockets, opened and left as they are."""
    port = int(url.rsplit(":", 1)[1])

    def connect(source: str = "127.0.0.1", rcvbuf: Optional[int] = None) -> socket.socket:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        return s

    def request(body: dict) -> bytes:
        data = json.dumps(body).encode()
        return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    stalled = []
    for _ in range(args.stalled_readers):
        s = connect("127.0.0.2", rcvbuf=1024)
        s.sendall(request({"prompt": ["x", "yy", "zzz", "w"], "max_tokens": 4096, "n": 8, "stream": True}))
        stalled.append(s)
    slow = []
    whole = request({"prompt": "x", "max_tokens": 8})
    head_end = whole.index(b"\r\n\r\n") + 4
    for i in range(args.slow_connections):
        s = connect("127.0.0.3")
        s.sendall([b"", whole[:head_end // 2], whole[:head_end + 5]][i % 3])  # nothing, half the headers, half a body
        slow.append(s)
    return stalled, slow


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed this connection (what it sent before, a 408 say, is read and dropped)."""
    s.setblocking(False)
    try:
        while True:
            if not s.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def hostile_check(checkpoint: Path, args: argparse.Namespace, logs: Path) -> dict:
    """Latency of well-behaved requests alone and then beside stalled readers and slow connections, on one
    server; then how many hostile connections the server cut."""
    extra = ("--max-tokens", "4096", "--stall-timeout", str(args.stall_timeout), "--header-timeout", "5",
             "--body-timeout", "5", "--max-slots-per-client", str(max(1, args.max_concurrency // 2)))
    server = Server(checkpoint, args, args.max_batch_size, logs / "serve-hostile.log", extra)
    rng = random.Random(args.seed + 2)
    polite = [("valid", {"json": {"prompt": "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))),
                                  "max_tokens": 16}}) for _ in range(args.hostile_requests)]
    phases = {}
    try:
        asyncio.run(run_load(server.url, polite[:8], 8))  # warm-up
        results, seconds = asyncio.run(run_load(server.url, polite, args.polite_concurrency))
        phases["alone"] = results, seconds
        stalled, slow = hostile_sockets(server.url, args)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the stalled readers are generating
        held = httpx.get(server.url + "/health").json()["running"]
        results, seconds = asyncio.run(run_load(server.url, polite, args.polite_concurrency))
        phases["with_hostile"] = results, seconds
        time.sleep(args.stall_timeout + 6)  # past every deadline: what is left is what the server did not cut
        left = httpx.get(server.url + "/health").json()["running"]
        cut = {"stalled_readers_closed": sum(closed_by_server(s) for s in stalled),
               "slow_connections_closed": sum(closed_by_server(s) for s in slow)}
        for s in stalled + slow:
            s.close()
    finally:
        code = server.stop()
    out: dict = {"requests_per_phase": args.hostile_requests, "polite_concurrency": args.polite_concurrency,
                 "stalled_readers": args.stalled_readers, "slow_connections": args.slow_connections,
                 "stall_timeout_s": args.stall_timeout, "places_held_by_stalled_readers": held}
    for name, (results, seconds) in phases.items():
        ok = [r[2] for r in results if r[1] == 200]
        out[name] = {"statuses": {str(st): sum(1 for r in results if r[1] == st) for st in sorted({r[1] for r in results})},
                     "latency_ms": {"p50": percentile(ok, 0.5), "p99": percentile(ok, 0.99)},
                     "seconds": round(seconds, 2)}
    for q in ("p50", "p99"):
        out[f"{q}_ratio_with_over_alone"] = round(out["with_hostile"]["latency_ms"][q] / out["alone"]["latency_ms"][q], 2)
    out.update(cut, generations_left_running_after_deadlines=left, server_exit_code=code)
    return out


def batching_check(checkpoint: Path, args: argparse.Namespace, logs: Path) -> dict:
    """Requests per second with micro-batching and without (--max-batch-size 1): both servers up at once,
    --batch-rounds alternating rounds (the order swapped each round, so load from elsewhere hits both
    alike); medians are reported."""
    rng = random.Random(args.seed + 1)
    requests = [("valid", {"json": {"prompt": "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))),
                                    "max_tokens": 32}}) for _ in range(args.batch_requests)]
    servers = {"batched": Server(checkpoint, args, args.max_batch_size, logs / "serve-batched.log")}
    rates: dict[str, list[float]] = {"batched": [], "unbatched": []}
    tokens: dict[str, list[float]] = {"batched": [], "unbatched": []}
    try:
        servers["unbatched"] = Server(checkpoint, args, 1, logs / "serve-unbatched.log")
        for server in servers.values():
            asyncio.run(run_load(server.url, requests[:8], 8))  # warm-up
        for round_ in range(args.batch_rounds):
            for name in (("batched", "unbatched") if round_ % 2 == 0 else ("unbatched", "batched")):
                results, seconds = asyncio.run(run_load(servers[name].url, requests, args.max_concurrency))
                assert all(r[1] == 200 for r in results), f"{name}: not all 200"
                rates[name].append(len(results) / seconds)
                tokens[name].append(sum(r[3] for r in results) / seconds)
        decodes = {name: httpx.get(s.url + "/health").json()["decodes"] for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    out: dict = {"requests_per_round": args.batch_requests, "client_concurrency": args.max_concurrency,
                 "rounds": args.batch_rounds}
    for name in rates:
        out[name] = {"requests_per_s": round(statistics.median(rates[name]), 1),
                     "completion_tokens_per_s": round(statistics.median(tokens[name]), 1),
                     "all_rounds_requests_per_s": [round(r, 1) for r in rates[name]], "decodes": decodes[name]}
    out["speedup"] = round(out["batched"]["requests_per_s"] / out["unbatched"]["requests_per_s"], 2)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(tmp)
        requests = make_requests(args.requests, random.Random(args.seed))
        here = machine()  # the load average too: other work on the machine slows everything alike
        server = Server(checkpoint, args, args.max_batch_size, tmp / "serve.log")
        try:
            asyncio.run(run_load(server.url, [r for r in requests if r[0] == "valid"][:16], 8))  # warm-up
            rss_before = server.rss_mb()
            results, seconds = asyncio.run(run_load(server.url, requests, args.concurrency))
            rss_after = server.rss_mb()
            rss_again = None
            if args.again:  # the same load once more: memory that keeps growing would be a leak
                more, more_seconds = asyncio.run(run_load(server.url, requests, args.concurrency))
                rss_again = round(server.rss_mb(), 1)
                more_unexpected = sum(1 for r in more if r[1] not in ALLOWED)
            health = httpx.get(server.url + "/health", timeout=5)
            alive = health.status_code == 200 and server.proc.poll() is None
            stats = health.json()
        finally:
            code = server.stop()
        summary = {"benchmark": "serve_load", "checkpoint": args.checkpoint or "tiny random (4x128, byte)",
                   "machine": here,
                   "concurrency": args.concurrency, "server": {"max_concurrency": args.max_concurrency,
                   "max_queue": args.max_queue, "max_batch_size": args.max_batch_size, "max_decodes": args.max_decodes,
                   "threads": args.threads},
                   **summarize(results, seconds),
                   "server_alive_after": alive, "server_exit_code": code, "server_stats": stats,
                   "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1),
                              "growth": round(rss_after - rss_before, 1)}}
        if rss_again is not None:
            summary["again"] = {"unexpected": more_unexpected, "seconds": round(more_seconds, 2),
                                "rss_mb_after": rss_again, "rss_mb_growth_over_first_run": round(rss_again - rss_after, 1)}
            summary["unexpected"] += more_unexpected
        if args.hostile_requests:
            summary["hostile"] = hostile_check(checkpoint, args, tmp)
        if args.batch_requests:
            summary["batching"] = batching_check(checkpoint, args, tmp)
    print(json.dumps(summary, indent=2))
    here["load_average_at_end"] = load_average()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    hostile = summary.get("hostile", {})
    healthy = (summary["unexpected"] == 0 and alive and code == 0
               and summary["rss_mb"]["growth"] <= args.max_rss_growth_mb
               and hostile.get("generations_left_running_after_deadlines", 0) == 0)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
