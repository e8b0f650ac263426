"""GGUF export in bf16 and the 5- and 4-bit block types (q5_1, q5_0, q4_1, q4_0): each matrix holds the bytes the
gguf package's quantizer writes for it, the head's matrix is q8_0 (q6_k when its rows are whole blocks of 256) as
llama.cpp's quantizer keeps the output at more bits, transformers' GGUF reader computes logits close to the model's,
and lmforge imports the file back to exactly what it holds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import MAKERS, fields, load_theirs  # noqa: E402
from test_interop import GPT2_STYLE, LLAMA_STYLE, lmforge_run  # noqa: E402

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from lmforge.checkpoint import load_for_inference  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf, read_gguf  # noqa: E402

# the largest logit error, relative to the largest logit, each type may make on these small random models
TOLERANCE = {"bf16": 1e-2, "q5_1": 0.08, "q5_0": 0.08, "q4_1": 0.15, "q4_0": 0.15}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_low_bit_matrices_are_gguf_quantizer_bytes_the_head_stays_q8_0_and_logits_stay_close(tmp_path, dtype, style):
    tied = style == "gpt2"  # GPT-2 reads its head from token_embd
    run = lmforge_run(tmp_path, MAKERS["char"](), **(GPT2_STYLE if tied else LLAMA_STYLE))
    path = export_gguf(run, tmp_path / "out" / f"{dtype}.gguf", dtype=dtype)
    model, _, _ = load_for_inference(run, "cpu")
    raw = gguf.GGMLQuantizationType[dtype.upper()]
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    down = model.blocks[1].mlp.proj.weight.detach().numpy()  # written as it is (no split, no interleave)
    assert tensors["blk.1.ffn_down.weight"].tensor_type == raw
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(-1),
                          gguf.quants.quantize(down, raw).reshape(-1))
    head = "token_embd.weight" if tied else "output.weight"
    assert tensors[head].tensor_type == (raw if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0)
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert fields(path)["general.file_type"] == int(gguf.LlamaFileType["MOSTLY_" + dtype.upper()])
    theirs, _ = load_theirs(path, model.config)  # transformers dequantizes as llama.cpp stores the blocks
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ours, other = model(ids), theirs(ids).logits
    assert 0 < (ours - other).abs().max() <= TOLERANCE[dtype] * ours.abs().max()
    back, _, _ = load_for_inference(import_gguf(path, tmp_path / "back"), "cpu")  # lmforge reads what it holds
    _, stored = read_gguf(path)
    assert torch.equal(back.blocks[1].mlp.proj.weight, stored["blk.1.ffn_down.weight"])
    with torch.no_grad():
        assert (back(ids) - other).abs().max() <= 1e-4 * other.abs().max()


@pytest.mark.parametrize("dtype", ["q4_0", "q5_1"])
def test_a_head_of_whole_256_blocks_is_q6_k_as_llama_quantize_makes_it(tmp_path, dtype):
    """llama-quantize gives the output Q6_K under the legacy types, Q8_0 only where its rows are not whole blocks
    of 256 (the narrow models above); lmforge's files are then llama.cpp's, head included."""
    from test_gguf_kquants import WIDE_LLAMA

    from lmforge.interop.gguf_kquants import quantize

    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, **WIDE_LLAMA})
    path = export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype)
    model, _, _ = load_for_inference(run, "cpu")
    head = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["output.weight"]
    assert head.tensor_type == gguf.GGMLQuantizationType.Q6_K
    assert np.array_equal(np.asarray(head.data).reshape(-1),
                          quantize(model.lm_head.weight.detach().numpy(), "q6_k").reshape(-1))


def test_fewer_bits_make_smaller_files_and_the_cli_takes_every_type(tmp_path):
    run = lmforge_run(tmp_path, MAKERS["char"](), **{**LLAMA_STYLE, "n_embd": 64})
    sizes = {}
    for dtype in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        out = tmp_path / f"{dtype}.gguf"
        assert main(["export", str(run), "--format", "gguf", "--gguf-type", dtype, "--out", str(out)]) == 0
        sizes[dtype] = out.stat().st_size
    assert sizes["f16"] == sizes["bf16"]
    order = ["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_0"]
    assert all(sizes[a] > sizes[b] for a, b in zip(order, order[1:])), sizes
    assert sizes["q5_0"] > sizes["q4_1"] > sizes["q4_0"]
