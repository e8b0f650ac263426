"""Throughput and memory of `lmforge prepare` with BPE, against the tokenizers library's own encode_batch.

1. Builds a synthetic corpus (default ~1 GB of .jsonl, many documents of 0.5-20 KB in mixed scripts:
   Latin with accents, Cyrillic, Greek, Chinese, emoji, digits), deterministic for a seed.
2. Runs `prepare(..., tokenizer="bpe")` in a child process, timing it, and reads the child's peak RSS
   (ru_maxrss of RUSAGE_CHILDREN). prepare reports its own step timings; its encode step reads the
   documents, encodes them and writes the shards.
3. In this process, loads the trained tokenizer into a bare Hugging Face tokenizer and times only its
   encode_batch (and encode_batch_fast) calls on the same documents in the same batches.

Prints MB/s of the prepare encode step and of the whole prepare, MB/s of the library, the ratio
(target >= 0.9) and the peak RSS (target < 1 GB), then one JSON summary.

    python benchmarks/prepare_throughput.py \\
        --json-out benchmarks/results/prepare_throughput-1gb-cpu.json   # the measurement (1 GB, ~5-10 min)
    python benchmarks/prepare_throughput.py --size-mb 200               # a quicker look
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.data.prepare import BATCH_BYTES, BATCH_DOCS  # noqa: E402  (the reference uses the same batches)
from lmforge.files import atomic_write_text  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

FILE_MB = 64  # size of each generated .jsonl file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1024, help="corpus size in MB (default 1024)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where to put the corpus and the output (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the corpus and the prepared data")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--child", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default="bpe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ corpus
def _words(rng: np.random.Generator, alphabet: str, n: int, lengths=(2, 9)) -> list[str]:
    letters = np.array(list(alphabet))
    return ["".join(rng.choice(letters, rng.integers(*lengths))) for _ in range(n)]


def _zipf_cdf(n: int) -> np.ndarray:
    """Cumulative weights 1/(rank+1) of n words: word frequencies of real text follow Zipf's law."""
    return np.cumsum(1.0 / np.arange(1, n + 1))


def _sentence_pool(rng: np.random.Generator, n: int = 100_000) -> list[str]:
    """Sentences in one script each; documents are drawn from this pool."""
    scripts = {
        "latin": (_words(rng, "abcdefghijklmnopqrstuvwxyzéèàüöñç", 20_000), " ", 0.6),
        "cyrillic": (_words(rng, "абвгдежзийклмнопрстуфхцчшщыэюя", 5_000), " ", 0.15),
        "greek": (_words(rng, "αβγδεζηθικλμνξοπρστυφχψω", 2_000), " ", 0.05),
        "chinese": (_words(rng, "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000)), 5_000, (1, 4)), "", 0.15),
        "mixed": (_words(rng, "0123456789", 1_000) + list("😀🎭🚀✨👍🏽❤️") + ["Hello", "naïve", "café"], " ", 0.05),
    }
    names = list(scripts)
    cdfs = {name: _zipf_cdf(len(vocab)) for name, (vocab, _, _) in scripts.items()}
    weights = np.array([scripts[k][2] for k in names])
    pool = []
    for script in rng.choice(len(names), n, p=weights / weights.sum()):
        name = names[script]
        vocab, sep, _ = scripts[name]
        cdf = cdfs[name]
        picks = np.searchsorted(cdf, rng.random(rng.integers(4, 20)) * cdf[-1])
        end = "。" if name == "chinese" else rng.choice([".", "!", "?", ",", ";"])
        pool.append(sep.join(vocab[i] for i in picks).capitalize() + end)
    return pool


def make_corpus(folder: Path, size_mb: float, seed: int) -> int:
    """Write ~size_mb MB of .jsonl documents into ``folder``; returns the bytes of text written."""
    rng = np.random.default_rng(seed)
    pool = np.array(_sentence_pool(rng), dtype=object)
    target, written, file_no = int(size_mb * 1e6), 0, 0
    while written < target:
        lines, file_bytes = [], 0
        while file_bytes < FILE_MB * 1e6 and written + file_bytes < target:
            sentences = pool[rng.integers(0, len(pool), rng.integers(5, 200))]
            paragraphs = np.array_split(sentences, max(1, len(sentences) // 8))
            text = "\n\n".join(" ".join(p) for p in paragraphs)
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
            file_bytes += len(text.encode("utf-8"))
        (folder / f"part-{file_no:04d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written += file_bytes
        file_no += 1
    return written


# ------------------------------------------------------------------------------------------ measure
def run_prepare_child(corpus: Path, out: Path, args, tokenizer: str = "bpe") -> dict:
    """prepare in a child process (training a BPE tokenizer, or with a given tokenizer.json); returns its
    report, wall time (process start and imports included) and peak RSS."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", str(corpus), str(out), "--tokenizer", tokenizer,
           "--vocab-size", str(args.vocab_size), "--workers", str(args.workers), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    return {"wall_s": wall, "peak_rss_bytes": peak_rss, "report": json.loads(proc.stdout)}


def child(corpus: str, out: str, args) -> None:
    from lmforge.data.prepare import prepare

    report = prepare([corpus], out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, workers=args.workers,
                     seed=args.seed, progress=False)
    print(json.dumps(report))


def _document_batches(corpus: Path):
    """The corpus documents in batches like prepare's (about BATCH_BYTES of text, at most BATCH_DOCS)."""
    batch, size = [], 0
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                batch.append(text)
                size += len(text.encode("utf-8"))
                if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                    yield batch, size
                    batch, size = [], 0
    if batch:
        yield batch, size


def reference_encode(corpus: Path, tokenizer_json: Path) -> dict:
    """Seconds spent inside the library's encode_batch and encode_batch_fast over the whole corpus."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(json.loads(tokenizer_json.read_text(encoding="utf-8"))["hf_tokenizer"]))
    hf.encode_special_tokens = True
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    total = 0
    for batch, size in _document_batches(corpus):
        total += size
        for name in seconds:
            t0 = time.perf_counter()
            getattr(hf, name)(batch)
            seconds[name] += time.perf_counter() - t0
    return {"bytes": total, **{f"{k}_s": v for k, v in seconds.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(*args.child, args)
        return
    here = machine()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmforge-bench-"))
    corpus, out = work / "corpus", work / "prepared"
    corpus.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        if not any(corpus.glob("*.jsonl")):
            make_corpus(corpus, args.size_mb, args.seed)
        print(f"corpus: {sum(p.stat().st_size for p in corpus.glob('*.jsonl')) / 1e6:.0f} MB in {corpus} "
              f"({time.perf_counter() - t0:.0f} s to build)", file=sys.stderr)
        result = run_prepare_child(corpus, out, args)
        ref = reference_encode(corpus, out / "tokenizer.json")
        # the pipeline alone (read, clean, shuffle, encode, write, report) with the tokenizer just trained
        shutil.copy(out / "tokenizer.json", work / "tokenizer.json")
        given = run_prepare_child(corpus, work / "prepared-given", args, tokenizer=str(work / "tokenizer.json"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    timings = result["report"]["timings_s"]
    mb = ref["bytes"] / 1e6
    encode_mbs = result["report"]["encoded_bytes"] / 1e6 / timings["encode"]
    lib = {k: mb / ref[f"{k}_s"] for k in ("encode_batch", "encode_batch_fast")}
    best = max(lib.values())
    here["load_average_at_end"] = load_average()
    summary = {
        "benchmark": "prepare_throughput", "machine": here,
        "corpus_mb": round(mb, 1),
        "prepare_wall_s": round(result["wall_s"], 1),
        "prepare_timings_s": timings,
        "prepare_end_to_end_mb_s": round(mb / result["wall_s"], 2),
        "prepare_encode_step_mb_s": round(encode_mbs, 2),
        "library_encode_batch_mb_s": round(lib["encode_batch"], 2),
        "library_encode_batch_fast_mb_s": round(lib["encode_batch_fast"], 2),
        "ratio_encode_step_vs_best_library": round(encode_mbs / best, 3),
        "prepare_given_tokenizer_wall_s": round(given["wall_s"], 1),
        "prepare_given_tokenizer_end_to_end_mb_s": round(mb / given["wall_s"], 2),
        "ratio_end_to_end_given_tokenizer_vs_encode_batch": round(mb / given["wall_s"] / lib["encode_batch"], 3),
        "peak_rss_mb": round(result["peak_rss_bytes"] / 2**20, 1),
        "vocab_size": result["report"]["tokenizer"]["vocab_size"],
        "tokens": sum(s["tokens"] for s in result["report"]["splits"].values()),
    }
    print(f"prepare encode step : {encode_mbs:8.2f} MB/s (read + encode + write shards)")
    print(f"library encode_batch: {lib['encode_batch']:8.2f} MB/s, encode_batch_fast {lib['encode_batch_fast']:.2f} MB/s")
    print(f"ratio               : {summary['ratio_encode_step_vs_best_library']:8.3f}  (target >= 0.9)")
    print(f"prepare end to end  : {summary['prepare_end_to_end_mb_s']:8.2f} MB/s, {result['wall_s']:.0f} s "
          f"(steps: {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    print(f"prepare, tokenizer given, end to end: {summary['prepare_given_tokenizer_end_to_end_mb_s']:8.2f} MB/s "
          f"= {summary['ratio_end_to_end_given_tokenizer_vs_encode_batch']:.3f} x encode_batch (target >= 0.9)")
    print(f"peak RSS of prepare : {summary['peak_rss_mb']:8.1f} MB  (target < 1024 MB)")
    print(json.dumps(summary))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
