"""PEFT import: a Hugging Face PEFT LoRA adapter, made by peft itself onto an HF model, read onto the lmforge model of
that base (`lmforge import ADAPTER --base RUN --out OUT`): the LoRA checkpoint computes PeftModel's logits, adapted
and merged, on sharp weights (std 0.3: a wrong scale, a swapped A/B, a misplaced block of B shows). Llama's q, k, v
slices and gate/up halves, GPT-2's c_attn over all three, ranks and alphas of their own per module (rank_pattern,
alpha_pattern), rsLoRA's scale, layers PEFT left alone (layers_to_transform), an untied head. lmforge's own PEFT
export comes back as the model it was. What lmforge's LoRA does not compute, or an adapter of another model, is
refused in one line and nothing is written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_peft import (CASES, CLASSIFIERS, GPT2_STYLE, LLAMA_STYLE, MERGED_TOLERANCE, TOLERANCE,  # noqa: E402
                       adapted_classifier, adapted_model, export_both, logits, sharp_model)

from lmforge.checkpoint import load_adapted_lora, load_for_inference, read_run_config, save_checkpoint  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import RunConfig, TrainConfig  # noqa: E402
from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.interop.hf_export import hf_files  # noqa: E402
from lmforge.interop.peft_export import WEIGHTS  # noqa: E402
from lmforge.interop.peft_import import PEFTImportError, import_peft  # noqa: E402
from lmforge.lora import LoRAConfig, apply_lora  # noqa: E402

# name -> (model options, peft.LoraConfig keywords)
PEFT_CASES = {
    "llama-every-module": (LLAMA_STYLE, dict(r=4, lora_alpha=6, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "llama-patterns-rslora": (LLAMA_STYLE, dict(r=4, lora_alpha=6, use_rslora=True, target_modules=[
        "q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2, "up_proj": 3}, alpha_pattern={"up_proj": 10})),
    "llama-one-layer-and-head": (LLAMA_STYLE, dict(r=4, lora_alpha=12, target_modules=["gate_proj", "lm_head"],
                                                   layers_to_transform=[1])),
    "gpt2-attention-and-mlp": (GPT2_STYLE, dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"],
                                                fan_in_fan_out=True)),
    # the token embedding (lora_embedding_A/B) at a rank of its own; on a tied model its head's tied adapter
    "llama-embedding-rank-2": (LLAMA_STYLE, dict(r=4, lora_alpha=6, target_modules=["embed_tokens", "q_proj"],
                                                 rank_pattern={"embed_tokens": 2})),
    "llama-tied-embedding": (dict(LLAMA_STYLE, tie_embeddings=True), dict(r=4, lora_alpha=6, target_modules=[
        "embed_tokens", "v_proj"], ensure_weight_tying=True)),
}
LINEAR_CASES = [case for case in PEFT_CASES if "embedding" not in case]  # (DoRA: lmforge's on Linear layers)


def base_run(root: Path, options: dict, seed: int = 0) -> tuple[Path, Path]:
    """A sharp lmforge model saved as ROOT/base (a run) and as an HF directory ROOT/hf."""
    model = sharp_model(options, seed)
    save_checkpoint(root / "base", 0, model, None, RunConfig(model=model.config), {"tokens_seen": 0})
    hf = root / "hf"
    hf.mkdir()
    for name, content in hf_files(model, tokenizer=None).items():
        if name.endswith(".safetensors"):
            save_file(content, str(hf / name), metadata={"format": "pt"})
        else:
            (hf / name).write_text(json.dumps(content))
    return root / "base", hf


def peft_adapter(hf: Path, out: Path, **lora) -> torch.nn.Module:
    """An adapter made by peft on the HF model in `hf`, A and B random (std 0.3), saved in `out`; the PeftModel."""
    base = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return model.eval()


IDS = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
IMPORTED = 3 * TOLERANCE  # B divided by lmforge's scale where PEFT's differs (alpha_pattern): rounded once more


@pytest.mark.parametrize("case", PEFT_CASES)
def test_an_adapter_peft_made_computes_peft_s_logits_adapted_and_merged(tmp_path, case):
    options, lora = PEFT_CASES[case]
    base, hf = base_run(tmp_path, options)
    theirs = peft_adapter(hf, tmp_path / "adapter", **lora)
    expected = logits(theirs, IDS)
    with torch.no_grad():
        with theirs.disable_adapter():
            assert (logits(theirs, IDS) - expected).abs().max() > 1.0  # the adapter changes the logits a lot
    ckpt = import_peft(tmp_path / "adapter", base, tmp_path / "lora")
    config = read_run_config(ckpt)
    adapted = load_adapted_lora(ckpt, config)
    assert (logits(adapted, IDS) - expected).abs().max() <= IMPORTED
    merged, _, _ = load_for_inference(tmp_path / "lora", "cpu")
    assert (logits(merged, IDS) - expected).abs().max() <= MERGED_TOLERANCE
    if case == "llama-patterns-rslora":  # lmforge keeps the config's own scale: alpha / sqrt(r) = 3
        assert config.lora.scale == pytest.approx(3.0) and config.lora.targets == ["mlp", "q", "v"]
        assert config.lora.r == 4  # the largest rank the adapters need: q's 4 (up's 3 in mlp.fc's lower half)


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_a_dora_adapter_peft_made_computes_peft_s_logits_adapted_and_merged(tmp_path, case):
    """use_dora: the magnitudes come to the rows they scale (Llama's gate alone: the up rows keep their own norm)."""
    options, lora = PEFT_CASES[case]
    base, hf = base_run(tmp_path, options)
    theirs = peft_adapter(hf, tmp_path / "adapter", **lora, use_dora=True)
    expected = logits(theirs, IDS)
    ckpt = import_peft(tmp_path / "adapter", base, tmp_path / "lora")
    config = read_run_config(ckpt)
    assert config.lora.dora
    assert (logits(load_adapted_lora(ckpt, config), IDS) - expected).abs().max() <= IMPORTED
    merged, _, _ = load_for_inference(tmp_path / "lora", "cpu")
    assert (logits(merged, IDS) - expected).abs().max() <= MERGED_TOLERANCE


def test_an_imported_adapter_trains_on_from_peft_s_model(tmp_path):
    """`lmforge train --train.init_from IMPORTED`: the run starts at PeftModel's logits and trains the adapters."""
    from tiny_training import tiny_config, tiny_trainer

    options, lora = PEFT_CASES["llama-patterns-rslora"]
    base, hf = base_run(tmp_path, options)
    expected = logits(peft_adapter(hf, tmp_path / "adapter", **lora), IDS)
    import_peft(tmp_path / "adapter", base, tmp_path / "lora")
    trainer = tiny_trainer(tiny_config(tmp_path / "next", **{"train.init_from": tmp_path / "lora", "train.max_steps": 2,
                                                              "optim.lr": 1e-2}))
    assert trainer.config.lora == read_run_config(tmp_path / "lora" / "checkpoints" / "step-00000000").lora
    assert (logits(trainer.raw_model.eval(), IDS) - expected).abs().max() <= IMPORTED
    before = logits(trainer.raw_model, IDS)
    trainer.raw_model.train()
    trainer.fit()
    assert (logits(trainer.raw_model.eval(), IDS) - before).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["gpt2-qvo-mlp", "llama-qvo-mlp", "llama-k-head", "gpt2-emb-qv", "llama-emb-o",
                                  "llama-tied-emb"])
def test_lmforge_s_own_peft_export_comes_back_as_the_same_model(tmp_path, case):
    model, lora, _ = adapted_model(case)
    expected = logits(model, IDS)
    plain = sharp_model(CASES[case][0])  # the same seed: the adapted model's base
    save_checkpoint(tmp_path / "run", 0, plain, None, RunConfig(model=plain.config), {"tokens_seen": 0})
    _, adapter = export_both(model, lora, tmp_path)
    ckpt = import_peft(adapter, tmp_path / "run", tmp_path / "back")
    back = load_adapted_lora(ckpt, read_run_config(ckpt))
    assert (logits(back, IDS) - expected).abs().max() <= TOLERANCE


def test_an_embedding_adapter_of_a_tied_model_without_the_heads_is_one_line(tmp_path, capsys):
    """peft adapts GPT-2's tied wte alone (the head reads the table unadapted): not what lmforge computes."""
    base, hf = base_run(tmp_path, GPT2_STYLE)
    peft_adapter(hf, tmp_path / "adapter", r=4, lora_alpha=6, target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    capsys.readouterr()  # (transformers' loading bars)
    assert main(["import", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "without the same adapter on lm_head" in err and "ensure_weight_tying=True" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_saved_its_heads_weights_is_refused_on_another_base(tmp_path):
    _, hf = base_run(tmp_path, LLAMA_STYLE)  # PEFT saves a targeted lm_head's own weight beside its adapter
    peft_adapter(hf, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    other, _ = base_run(tmp_path / "other", LLAMA_STYLE, seed=1)  # the same shapes, other weights
    with pytest.raises(PEFTImportError, match="holds lm_head's own weight, which differs from the base's"):
        import_peft(tmp_path / "adapter", other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_a_seq_cls_adapter_with_its_head_comes_back_as_the_classifier_on_the_language_models_body(tmp_path, arch):
    model, lora, tok = adapted_classifier(arch)
    _, adapter = export_both(model, lora, tmp_path, tok)  # peft's SEQ_CLS layout: score saved as modules_to_save
    lm = sharp_model(dict(CLASSIFIERS[arch], vocab_size=tok.vocab_size))  # a language model of the classifier's body
    body = {k: v for k, v in model.state_dict().items() if "lora" not in k and not k.startswith("classifier")}
    lm.load_state_dict({**lm.state_dict(), **body})
    save_checkpoint(tmp_path / "lm", 0, lm, None, RunConfig(model=lm.config), {"tokens_seen": 0})
    ckpt = import_peft(adapter, tmp_path / "lm", tmp_path / "back")
    config = read_run_config(ckpt)
    assert (config.model.head, config.model.num_labels) == ("classify", 3)
    ids = torch.randint(3, tok.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ids[1, 12:] = tok.pad_id
    mask = ids != tok.pad_id
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
        assert expected.abs().max() > 1.0
        got = load_adapted_lora(ckpt, config)(ids, attention_mask=mask)
    assert (got - expected).abs().max() <= TOLERANCE
    merged, _, _ = load_for_inference(tmp_path / "back", "cpu")
    with torch.no_grad():
        assert (merged(ids, attention_mask=mask) - expected).abs().max() <= MERGED_TOLERANCE
    without_head = json.loads((adapter / "adapter_config.json").read_text())
    write_adapter(tmp_path / "headless", without_head, {k: v for k, v in load_file(adapter / WEIGHTS).items()
                                                        if "score" not in k})
    with pytest.raises(PEFTImportError, match="SEQ_CLS adapter without its trained head"):
        import_peft(tmp_path / "headless", tmp_path / "lm", tmp_path / "x")


def write_adapter(root: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


def test_the_cli_imports_an_adapter_onto_base_and_refuses_one_without_it(tmp_path, capsys):
    base, hf = base_run(tmp_path, LLAMA_STYLE)
    peft_adapter(hf, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    capsys.readouterr()  # (transformers' loading bar)
    assert main(["import", str(tmp_path / "adapter"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "PEFT adapter" in err and "--base" in err and "\n" not in err, err
    assert not (tmp_path / "x").exists()
    assert main(["import", str(tmp_path / "adapter"), "--base", str(base), "--out", str(tmp_path / "x")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x" / "checkpoints" / "step-00000000")
    assert main(["import", str(hf), "--base", str(base), "--out", str(tmp_path / "y")]) == 2  # not an adapter
    assert "--base applies to an adapter" in capsys.readouterr().err and not (tmp_path / "y").exists()


GOOD = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
GOOD_TENSORS = {A: torch.ones(2, 32), B: torch.ones(32, 2)}


@pytest.mark.parametrize("case,config,tensors,needle", [
    ("dora-without-magnitudes", {**GOOD, "use_dora": True}, GOOD_TENSORS, "lora_magnitude_vector"),
    ("bias", {**GOOD, "bias": "all"}, GOOD_TENSORS, "bias 'all'"),
    ("modules-to-save", {**GOOD, "modules_to_save": ["lm_head"]}, GOOD_TENSORS, "modules_to_save"),
    ("token-cls", {**GOOD, "task_type": "TOKEN_CLS"}, GOOD_TENSORS, "task_type 'TOKEN_CLS'"),
    ("prefix-tuning", {**GOOD, "peft_type": "PREFIX_TUNING"}, GOOD_TENSORS, "peft_type 'PREFIX_TUNING'"),
    ("zero-alpha", {**GOOD, "lora_alpha": 0}, GOOD_TENSORS, "lora_alpha=0"),
    ("bad-pattern", {**GOOD, "alpha_pattern": {"q_proj(": 8}}, GOOD_TENSORS, "not a regular expression"),
    ("pattern-value", {**GOOD, "alpha_pattern": {"q_proj": "8"}}, GOOD_TENSORS, "alpha_pattern 'q_proj': '8'"),
    ("dropout", {**GOOD, "lora_dropout": "0.1"}, GOOD_TENSORS, "lora_dropout='0.1'"),
    ("embedding", GOOD, {**GOOD_TENSORS, "base_model.model.model.embed_tokens.lora_A.weight": torch.ones(2, 61)},
     "embed_tokens"),
    ("half", GOOD, {A: torch.ones(2, 32)}, "without its other half"),
    ("other-model", GOOD, {A: torch.ones(2, 64), B: torch.ones(64, 2)}, "trained on another model than --base"),
    ("nothing", GOOD, {}, "holds no adapters"),
])
def test_what_lmforge_cannot_compute_or_does_not_fit_is_refused_in_one_line(tmp_path, capsys, case, config, tensors,
                                                                           needle):
    base, _ = base_run(tmp_path, LLAMA_STYLE)
    adapter = write_adapter(tmp_path / "adapter", config, tensors)
    assert main(["import", str(adapter), "--base", str(base), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_config_nested_too_deep_for_json_is_one_line(tmp_path, capsys):
    base, _ = base_run(tmp_path, LLAMA_STYLE)
    adapter = write_adapter(tmp_path / "adapter", GOOD, GOOD_TENSORS)
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["import", str(adapter), "--base", str(base), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not readable JSON (RecursionError)" in err and "\n" not in err, err


def test_a_pickle_is_never_opened_and_the_base_must_be_plain_and_the_out_new(tmp_path):
    base, _ = base_run(tmp_path, LLAMA_STYLE)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(GOOD))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(PEFTImportError, match="a pickle, which lmforge never opens"):
        import_peft(pickled, base, tmp_path / "out")
    adapter = write_adapter(tmp_path / "adapter", GOOD, GOOD_TENSORS)
    model, _, _ = load_for_inference(base, "cpu")
    lora_run = tmp_path / "lora-base"
    adapted = apply_lora(model, LoRAConfig(r=2, targets=["q"]))
    config = RunConfig(model=model.config, lora=LoRAConfig(r=2, targets=["q"]), train=TrainConfig(init_from=str(base)))
    save_checkpoint(lora_run, 0, adapted, None, config,
                    {"tokens_seen": 0, "base": {"path": str(base), "fingerprint": "0" * 64}})
    with pytest.raises(PEFTImportError, match="is a LoRA run itself; merge it first"):
        import_peft(adapter, lora_run, tmp_path / "out")
    import_peft(adapter, base, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        import_peft(adapter, base, tmp_path / "out")
    assert not (tmp_path / "out-2").exists()
