"""A LoRA run's adapters as a llama.cpp LoRA adapter (`lmforge export RUN --format gguf --adapter`): for every
adapted matrix, the base's GGUF tensor plus (alpha / rank) B A, as llama.cpp computes it from the file, is the
merged model's GGUF tensor (rows of Llama's q and k heads reordered alike, fused modules' ranks and slices, the
head); the file says what it is; misuse is one line. Read back onto its base (`lmforge import adapter.gguf --base
RUN`), an adapter file is the adapted model again, also one whose tensors are f16 or q8_0 as llama.cpp's converter
writes them."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_lora_train import lora_config  # noqa: E402
from test_peft import CASES, LLAMA_STYLE, R, adapted_model, random_adapters, sharp_model  # noqa: E402
from tiny_training import tiny_trainer, write_base  # noqa: E402

gguf = pytest.importorskip("gguf")

from lmforge.cli import main  # noqa: E402
from lmforge.interop import gguf_export  # noqa: E402
from lmforge.interop.gguf_export import GGUFExportError  # noqa: E402
from lmforge.checkpoint import load_adapted_lora, read_run_config, save_checkpoint  # noqa: E402
from lmforge.config import RunConfig  # noqa: E402
from lmforge.interop.gguf_lora import adapter_tensors, export_gguf_adapter, write_gguf_adapter  # noqa: E402
from lmforge.interop.peft_import import PEFTImportError  # noqa: E402
from lmforge.lora import LoRAConfig, apply_lora, merge_lora  # noqa: E402

# the llama.cpp tensors each case adapts, with their ranks (CASES' Hugging Face modules under llama.cpp's names)
ADAPTED = {
    "gpt2-qvo-mlp": {"attn_qkv": 2 * R, "attn_output": R, "ffn_up": R, "ffn_down": R},
    "gpt2-k": {"attn_qkv": R},
    "gpt2-qkv-head": {"attn_qkv": 3 * R, "output": R},
    "llama-qvo-mlp": {"attn_q": R, "attn_v": R, "attn_output": R, "ffn_gate": R, "ffn_up": R, "ffn_down": R},
    "llama-k-head": {"attn_k": R, "output": R},
    "llama-emb-o": {"token_embd": R, "attn_output": R},  # (untied: llama.cpp adapts the embedding's lookup only)
}


def applied(base: dict, adapter: dict, alpha: float) -> dict:
    """What llama.cpp computes with the adapter loaded: each adapted tensor W + (alpha / rank) B A."""
    out = dict(base)
    for name in base:
        if f"{name}.lora_a" in adapter:
            a, b = adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"]
            if name == "token_embd.weight":  # a row's lookup plus (alpha / rank) b a[token]: a is (V, rank)
                assert a.shape == (base[name].shape[0], b.shape[1]) and b.shape[0] == base[name].shape[1]
                out[name] = base[name] + (alpha / b.shape[1]) * a @ b.t()
                continue
            assert a.shape == (b.shape[1], base[name].shape[1]) and b.shape[0] == base[name].shape[0], name
            out[name] = base[name] + (alpha / b.shape[1]) * b @ a
    return out


def check_against_merged(model, lora: LoRAConfig, arch: str, base_model, adapter_arch: str = "") -> dict:
    adapter = adapter_tensors(model, lora, adapter_arch or arch)
    base = dict(gguf_export._tensors(base_model.state_dict(), base_model.config, arch))
    merged_model = merge_lora(copy.deepcopy(model))
    merged = dict(gguf_export._tensors(merged_model.state_dict(), merged_model.config, arch))
    ours = applied(base, adapter, lora.alpha)
    assert ours.keys() == merged.keys()
    for name in merged:
        assert torch.allclose(ours[name], merged[name], atol=1e-5), name
    return adapter


@pytest.mark.parametrize("case", [c for c in CASES if c in ADAPTED])
def test_base_plus_the_adapter_as_llama_cpp_applies_it_is_the_merged_model(case):
    model, lora, _ = adapted_model(case)
    model_options = CASES[case][0]
    arch = "gpt2" if case.startswith("gpt2") else "llama"
    adapter = check_against_merged(model, lora, arch, sharp_model(model_options))
    ranks = {name.rsplit(".", 2)[0].split(".")[-1]: t.shape[1] for name, t in adapter.items()
             if name.endswith(".lora_b")}
    assert ranks == ADAPTED[case]
    assert {n.split(".")[1] for n in adapter if n.startswith("blk.")} == {"0", "1"}  # every layer


def test_a_qwen2_layout_keeps_its_rows_in_order():
    """llama.cpp's qwen2 rotates halves as lmforge does: B's rows, like the base's, are not reordered."""
    options = dict(LLAMA_STYLE, qkv_bias=True)
    lora = LoRAConfig(r=R, alpha=6.0, targets=["q", "k", "v"])
    model = random_adapters(apply_lora(sharp_model(options), lora))
    check_against_merged(model, lora, "qwen2", sharp_model(options))
    with pytest.raises(AssertionError, match="attn_q"):  # B's rows reordered as for a llama file: another model
        check_against_merged(model, lora, "qwen2", sharp_model(options), adapter_arch="llama")


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lora_run_exports_its_adapter_and_the_cli_refuses_misuse_in_one_line(tmp_path, capsys, rslora):
    """rsLoRA (r 4: scale alpha / 2) is written as the alpha llama.cpp's alpha / rank gives that scale with: 24."""
    base = write_base(tmp_path)
    run = tmp_path / "run"
    tiny_trainer(lora_config(run, base, **{"lora.alpha": 12.0, "lora.targets": "q,v,o,mlp", "lora.rslora": rslora}),
                 tokenizer_file=tmp_path / "tokenizer.json").fit()
    adapter_path, merged_path, base_path = tmp_path / "a.gguf", tmp_path / "merged.gguf", tmp_path / "base.gguf"
    assert main(["export", str(run), "--format", "gguf", "--adapter", "--out", str(adapter_path)]) == 0
    assert main(["export", str(run), "--format", "gguf", "--out", str(merged_path)]) == 0
    assert main(["export", str(base), "--format", "gguf", "--out", str(base_path)]) == 0
    reader = gguf.GGUFReader(str(adapter_path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == (
        "adapter", "lora", 24.0 if rslora else 12.0)

    def tensors(path):
        return {t.name: torch.from_numpy(t.data.copy()).reshape(tuple(int(n) for n in reversed(t.shape)))
                for t in gguf.GGUFReader(str(path)).tensors}

    adapter, merged = tensors(adapter_path), tensors(merged_path)
    ours = applied(tensors(base_path), adapter, fields["adapter.lora.alpha"])
    assert len(adapter) == 2 * 4 * 2  # 2 layers x (attn_qkv, attn_output, ffn_up, ffn_down) x (a, b)
    for name in merged:
        assert torch.allclose(ours[name], merged[name], atol=1e-5), name
    capsys.readouterr()
    for argv, message in (
            ([str(base), "--format", "gguf", "--adapter"], "is not a LoRA run"),
            ([str(run), "--format", "hf", "--adapter"], "--adapter applies to --format gguf"),
            ([str(run), "--format", "gguf", "--adapter", "--gguf-type", "q8_0"], "drop --gguf-type q8_0")):
        assert main(["export", *argv, "--out", str(tmp_path / "x.gguf")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(GGUFExportError, match="not a GGUF export written by lmforge|written by lmforge"):
        (tmp_path / "mine.gguf").write_bytes(b"my notes")
        export_gguf_adapter(run, tmp_path / "mine.gguf", force=True)
    assert (tmp_path / "mine.gguf").read_bytes() == b"my notes"


@pytest.mark.parametrize("case", [c for c in CASES if c in ADAPTED])
def test_an_adapter_file_read_back_onto_its_base_is_the_adapted_model(tmp_path, case, capsys):
    model, lora, _ = adapted_model(case)
    arch = "gpt2" if case.startswith("gpt2") else "llama"
    base = sharp_model(CASES[case][0])  # the same seed: the adapted model's base
    save_checkpoint(tmp_path / "base", 0, base, None, RunConfig(model=base.config), {"tokens_seen": 0})
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids)
    path = write_gguf_adapter(adapter_tensors(model, lora, arch), arch, lora.alpha, tmp_path / "a.gguf")
    assert main(["import", str(path), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "back")]) == 0
    ckpt = tmp_path / "back" / "checkpoints" / "step-00000000"
    assert capsys.readouterr().out.strip() == str(ckpt)
    with torch.no_grad():
        assert (load_adapted_lora(ckpt, read_run_config(ckpt))(ids) - expected).abs().max() <= 3e-5
    if case in ("llama-qvo-mlp", "gpt2-qvo-mlp"):  # as llama.cpp's converter may write them: A in q8_0 and B in
        # f16, alpha 0 (scale 1 for every matrix, whatever its rank: GPT-2's attn_qkv has twice the others')
        tensors = adapter_tensors(model, lora, arch)
        writer = gguf.GGUFWriter(str(tmp_path / "converted.gguf"), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        q8 = gguf.GGMLQuantizationType.Q8_0
        for name, t in tensors.items():
            if name.endswith("lora_a"):  # rows of 32 inputs: whole q8_0 blocks
                writer.add_tensor(name, gguf.quants.quantize(t.numpy(), q8), raw_dtype=q8)
            else:  # scale 1 where llama.cpp's was alpha / rank: B carries the scale
                writer.add_tensor(name, (t * lora.alpha / t.shape[1]).half().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert main(["import", str(tmp_path / "converted.gguf"), "--base", str(tmp_path / "base"), "--out",
                     str(tmp_path / "converted")]) == 0
        ckpt = tmp_path / "converted" / "checkpoints" / "step-00000000"
        with torch.no_grad():
            got = load_adapted_lora(ckpt, read_run_config(ckpt))(ids)
        error = (got - expected).abs().max() / expected.abs().max()
        assert 0 < error < 0.1, error  # 8 bits of A and 11 of B, amplified by sharp weights: close, not equal


def test_an_adapter_of_another_architecture_or_no_adapter_is_refused_in_one_line(tmp_path, capsys):
    model, lora, _ = adapted_model("llama-qvo-mlp")
    gpt2 = sharp_model(CASES["gpt2-k"][0])
    save_checkpoint(tmp_path / "gpt2", 0, gpt2, None, RunConfig(model=gpt2.config), {"tokens_seen": 0})
    path = write_gguf_adapter(adapter_tensors(model, lora, "llama"), "llama", lora.alpha, tmp_path / "a.gguf")
    assert main(["import", str(path), "--base", str(tmp_path / "gguf-base"), "--out", str(tmp_path / "x")]) == 2
    assert main(["import", str(path), "--base", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not exist" in err[0] or "gguf-base" in err[0]
    assert "adapts a 'llama' model and --base" in err[1] and "'gpt2'" in err[1], err
    assert main(["import", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "is a llama.cpp LoRA adapter: give --base RUN" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    gpt2_model, gpt2_lora, _ = adapted_model("gpt2-k")  # A and B transposed, as llama.cpp's converter writes GPT-2's
    tensors = adapter_tensors(gpt2_model, gpt2_lora, "gpt2")
    flipped = {name: tensors[name[:-1] + ("b" if name.endswith("a") else "a")].T.contiguous()  # A' = B^T, B' = A^T
               for name in tensors}
    path = write_gguf_adapter(flipped, "gpt2", gpt2_lora.alpha, tmp_path / "flipped.gguf")
    with pytest.raises(PEFTImportError, match=r"attn.c_attn's adapter is transposed, A \(4, 96\) and B \(32, 4\)"):
        from lmforge.interop.gguf_lora import import_gguf_adapter
        import_gguf_adapter(path, tmp_path / "gpt2", tmp_path / "x")
    llama = sharp_model(CASES["llama-qvo-mlp"][0])
    save_checkpoint(tmp_path / "llama", 0, llama, None, RunConfig(model=llama.config), {"tokens_seen": 0})
    wide = {n: torch.cat([t, t], dim=1) if n.endswith("lora_a") else t
            for n, t in adapter_tensors(model, lora, "llama").items()}  # A over 64 inputs: another model's
    path = write_gguf_adapter(wide, "llama", lora.alpha, tmp_path / "wide.gguf")
    from lmforge.interop.gguf_lora import import_gguf_adapter
    with pytest.raises(PEFTImportError, match="trained on another model than --base"):
        import_gguf_adapter(path, tmp_path / "llama", tmp_path / "x")
    taller = {n: torch.cat([t, t[:1]]) if n.endswith("attn_q.weight.lora_b") else t  # q's B: 33 rows for 32, not
              for n, t in adapter_tensors(model, lora, "llama").items()}  # whole heads either
    path = write_gguf_adapter(taller, "llama", lora.alpha, tmp_path / "taller.gguf")
    with pytest.raises(PEFTImportError, match="trained on another model than --base"):
        import_gguf_adapter(path, tmp_path / "llama", tmp_path / "x")
    path = write_gguf_adapter(adapter_tensors(model, lora, "llama"), "llama", lora.alpha, tmp_path / "alpha.gguf")
    with pytest.raises(PEFTImportError, match="adapter.lora.alpha 'six': a number >= 0 is needed"):
        import_gguf_adapter(_rewritten_alpha(path, "six"), tmp_path / "llama", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["gpt2-emb-qv", "llama-tied-emb"])
def test_an_embedding_adapter_of_a_tied_model_is_refused_in_one_line(case):
    """llama.cpp computes a tied model's output from the table without the table's adapter: not the run's model."""
    model, lora, _ = adapted_model(case)
    with pytest.raises(GGUFExportError, match="head is tied to it.*export the run merged"):
        adapter_tensors(model, lora, "gpt2" if case.startswith("gpt2") else "llama")


def _rewritten_alpha(path: Path, alpha) -> Path:
    """A copy of the adapter file with adapter.lora.alpha set to `alpha` (a string here: a damaged file)."""
    reader = gguf.GGUFReader(str(path))
    out = path.with_name("rewritten.gguf")
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_string(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
