"""PEFT export: lmforge's LoRA adapters as a Hugging Face PEFT adapter that peft loads onto the exported base.

Every HF model here is the lmforge model exported with peft_export.base_files into a temp directory; the adapter
is loaded with peft.PeftModel.from_pretrained and compared with the lmforge adapted model in fp32 on sharp weights
(std 0.3), so a wrong scale, a swapped or transposed A/B or a misplaced block of B shows in the logits. Language
models (CAUSAL_LM) and classifiers (SEQ_CLS, the trained head carried in the adapter as modules_to_save).
"""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lmforge.checkpoint import load_adapted_lora, read_run_config, save_checkpoint, verified_checkpoint  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.interop.hf_export import HFExportError, hf_files  # noqa: E402
from lmforge.interop.peft_export import CONFIG, WEIGHTS, base_files, export_peft, peft_adapter_files  # noqa: E402
from lmforge.lora import LoRAConfig, apply_lora, lora_parameters  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import byte_tokenizer  # noqa: E402
from lmforge.train import Trainer  # noqa: E402
from tiny_training import tiny_config  # noqa: E402

TOLERANCE = 1e-5  # fp32, max abs difference of logits
MERGED_TOLERANCE = 5e-5  # after merging: W + scale B A is rounded once per weight, and differences add up over layers
GPT2_STYLE = dict(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh")
LLAMA_STYLE = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
                   mlp="swiglu", pos_encoding="rope", bias=False, tie_embeddings=False, rope_theta=20000.0)
# (model, lmforge targets) -> the HF modules PEFT adapts, and the rank of each (r = 4 below)
CASES = {
    "gpt2-qvo-mlp": (GPT2_STYLE, ["q", "v", "o", "mlp"],
                     {"attn.c_attn": 8, "attn.c_proj": 4, "mlp.c_fc": 4, "mlp.c_proj": 4}),
    "gpt2-k": (GPT2_STYLE, ["k"], {"attn.c_attn": 4}),
    "gpt2-qkv-head": (dict(GPT2_STYLE, tie_embeddings=False), ["q", "k", "v", "head"],
                      {"attn.c_attn": 12, "lm_head": 4}),
    "llama-qvo-mlp": (LLAMA_STYLE, ["q", "v", "o", "mlp"],
                      {"self_attn.q_proj": 4, "self_attn.v_proj": 4, "self_attn.o_proj": 4, "mlp.gate_proj": 4,
                       "mlp.up_proj": 4, "mlp.down_proj": 4}),
    "llama-k-head": (LLAMA_STYLE, ["k", "head"], {"self_attn.k_proj": 4, "lm_head": 4}),
    # the token embedding (peft's lora_embedding_A/B); a tied head reads the adapted table: its own adapter, tied
    "gpt2-emb-qv": (GPT2_STYLE, ["emb", "q", "v"], {"attn.c_attn": 8, "wte": 4, "lm_head": 4}),
    "llama-emb-o": (LLAMA_STYLE, ["emb", "o"], {"embed_tokens": 4, "self_attn.o_proj": 4}),
    "llama-tied-emb": (dict(LLAMA_STYLE, tie_embeddings=True), ["emb"], {"embed_tokens": 4, "lm_head": 4}),
}
TIED_TABLES = ("gpt2-emb-qv", "llama-tied-emb")  # peft folds the table's adapter into the one weight twice
R, ALPHA = 4, 6.0  # scale 1.5: neither 1 nor the 2 a forgotten rank factor of 2 would give
CLASSIFIERS = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}


def sharp_model(model_options: dict, seed: int = 0) -> GPT:
    """A random GPT whose matrices have std 0.3 (attention far from uniform) and non-trivial norms and biases."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**model_options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model


def adapted_model(case: str) -> tuple[GPT, LoRAConfig, dict]:
    """The case's sharp model with random adapters (B is 0 at init), its LoRAConfig, and its plain base's HF files."""
    model_options, targets, _ = CASES[case]
    model = sharp_model(model_options)
    base_files = hf_files(model, tokenizer=None)
    lora = LoRAConfig(r=R, alpha=ALPHA, targets=targets)
    return random_adapters(apply_lora(model, lora)), lora, base_files


def random_adapters(model: GPT) -> GPT:
    """The adapted model with A and B of std 0.3 (B is 0 at init: the adapters would change nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def adapted_classifier(arch: str) -> tuple[GPT, LoRAConfig, object]:
    """A sharp 3-label classifier on the byte vocabulary (so its export names a pad token) with random adapters on
    q, v, o, mlp; its head (std 0.3) stands for the one a LoRA run trains whole. Also its LoRAConfig and tokenizer."""
    tok = byte_tokenizer()
    model = sharp_model(dict(CLASSIFIERS[arch], vocab_size=tok.vocab_size, head="classify", num_labels=3))
    lora = LoRAConfig(r=R, alpha=ALPHA, targets=["q", "v", "o", "mlp"])
    return random_adapters(apply_lora(model, lora)), lora, tok


def export_both(model: GPT, lora: LoRAConfig, root, tokenizer=None) -> tuple:
    """The base as an HF directory (base_files of the adapted model) and the adapter as a PEFT directory."""
    base = root / "base"
    base.mkdir()
    for name, content in base_files(model, tokenizer).items():
        if name.endswith(".safetensors"):
            save_file(content, str(base / name), metadata={"format": "pt"})
        else:
            (base / name).write_text(json.dumps(content))
    return base, export_peft(model, lora, root / "adapter", str(base))


def shapes(directory) -> dict[str, tuple]:
    """{tensor name: shape} of the adapter weights in `directory`."""
    with safe_open(directory / WEIGHTS, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_the_adapter_onto_the_exported_base_with_equal_logits(tmp_path, case):
    model, lora, base_files = adapted_model(case)
    # An adapted model exports as its base: the frozen weights keep their names, the adapters are left out.
    exported = hf_files(model, tokenizer=None)["model.safetensors"]
    assert exported.keys() == base_files["model.safetensors"].keys()
    assert all(torch.equal(exported[k], base_files["model.safetensors"][k]) for k in exported)
    base_dir, adapter_dir = export_both(model, lora, tmp_path)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    ours = logits(model, ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (logits(base, ids) - ours).abs().max() > 1.0  # the adapters change the logits a lot
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert (logits(theirs, ids) - ours).abs().max() <= TOLERANCE
    # Merged by peft (fan_in_fan_out transposes the delta for GPT-2's Conv1D): the same function. (Not a tied table
    # with an adapter: peft merges it once as the embedding and once as the head, peft issue 2777.)
    if case not in TIED_TABLES:
        assert (logits(theirs.merge_and_unload(), ids) - ours).abs().max() <= MERGED_TOLERANCE
    # base_model_name_or_path leads AutoPeftModel to the exported base.
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert (logits(auto, ids) - ours).abs().max() <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_names_shapes_and_scales_are_those_peft_saves_itself(tmp_path, case):
    model, lora, _ = adapted_model(case)
    base_dir, adapter_dir = export_both(model, lora, tmp_path)
    config = json.loads((adapter_dir / CONFIG).read_text())
    ranks = CASES[case][2]
    assert sorted(config["target_modules"]) == sorted(ranks)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["inference_mode"] is True
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["fan_in_fan_out"] is case.startswith("gpt2")
    # peft's own adapter for those targets and ranks: the same tensor names and shapes
    smallest = min(ranks.values())
    peft_config = peft.LoraConfig(task_type="CAUSAL_LM", r=smallest, lora_alpha=1.0, target_modules=list(ranks),
                                  rank_pattern={m: k for m, k in ranks.items() if k != smallest},
                                  fan_in_fan_out=case.startswith("gpt2"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    # save_embedding_layers=False: peft's "auto" would also store lm_head's base weight when lm_head is a target
    # (for vocabularies resized in training); an lmforge adapter never changes the base, which has that weight.
    peft.get_peft_model(hf, peft_config).save_pretrained(tmp_path / "peft", save_embedding_layers=False)

    assert shapes(adapter_dir) == shapes(tmp_path / "peft")
    # every adapted module scales by lmforge's alpha / r, whatever its rank
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    scales = {name: m.scaling["default"] for name, m in loaded.named_modules() if hasattr(m, "lora_A")}
    assert len(scales) == len(shapes(adapter_dir)) // 2 and set(scales.values()) == {ALPHA / R}


def test_gate_and_up_share_A_and_split_B_and_c_attn_stacks_the_slices():
    model, lora, _ = adapted_model("llama-qvo-mlp")
    weights = peft_adapter_files(model, lora)[WEIGHTS]
    fc = model.blocks[0].mlp.fc.lora["mlp"]
    gate, up = "base_model.model.model.layers.0.mlp.gate_proj", "base_model.model.model.layers.0.mlp.up_proj"
    assert torch.equal(weights[f"{gate}.lora_A.weight"], fc.A) and torch.equal(weights[f"{up}.lora_A.weight"], fc.A)
    assert torch.equal(torch.cat([weights[f"{gate}.lora_B.weight"], weights[f"{up}.lora_B.weight"]]), fc.B)
    model, lora, _ = adapted_model("gpt2-qvo-mlp")
    weights = peft_adapter_files(model, lora)[WEIGHTS]
    qkv = model.blocks[1].attn.qkv
    A, B = (weights[f"base_model.model.transformer.h.1.attn.c_attn.lora_{x}.weight"] for x in "AB")
    assert torch.equal(A, torch.cat([qkv.lora["q"].A, qkv.lora["v"].A]))  # (2r, C)
    C = 32
    assert torch.equal(B[:C, :R], qkv.lora["q"].B) and torch.equal(B[2 * C:, R:], qkv.lora["v"].B)
    assert not B[:C, R:].any() and not B[C:2 * C].any() and not B[2 * C:, :R].any()


def test_export_replaces_only_an_earlier_peft_export_and_only_with_force(tmp_path):
    model, lora, _ = adapted_model("gpt2-k")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(HFExportError, match="is not a PEFT adapter written by lmforge: choose a new"):
            export_peft(model, lora, tmp_path / "theirs", force=force)
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["keep.txt"]
    export_peft(model, lora, tmp_path / "ours")
    with pytest.raises(HFExportError, match="already holds a PEFT adapter written by lmforge: pass --force"):
        export_peft(model, lora, tmp_path / "ours")
    with torch.no_grad():
        model.blocks[0].attn.qkv.lora["k"].B.mul_(2.0)
    assert export_peft(model, lora, tmp_path / "ours", force=True) == tmp_path / "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]  # no temporaries left
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [CONFIG, WEIGHTS]
    with safe_open(tmp_path / "ours" / WEIGHTS, "pt") as f:
        B = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
    assert torch.equal(B[32:64], model.blocks[0].attn.qkv.lora["k"].B)  # the new adapter replaced the old


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_peft_loads_a_classifier_adapter_with_its_trained_head_onto_the_exported_base(tmp_path, arch):
    model, lora, tok = adapted_classifier(arch)
    base_dir, adapter_dir = export_both(model, lora, tmp_path, tok)
    ids = torch.randint(3, tok.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ids[1, 12:] = tok.pad_id  # right-padded rows: both read each row's last real token
    ids[2, 5:] = tok.pad_id
    mask = ids != tok.pad_id
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)  # (3, num_labels)

    def scores(hf_model) -> torch.Tensor:
        with torch.no_grad():
            return hf_model(ids, attention_mask=mask.long()).logits

    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    assert type(base).__name__ == ("GPT2ForSequenceClassification" if arch == "gpt2"
                                   else "LlamaForSequenceClassification")
    assert not scores(base).any()  # the base's score is zeros: the trained head travels in the adapter
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert ours.abs().max() > 1.0 and (scores(theirs) - ours).abs().max() <= TOLERANCE
    assert (scores(theirs.merge_and_unload()) - ours).abs().max() <= MERGED_TOLERANCE
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    assert (scores(auto) - ours).abs().max() <= TOLERANCE


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_a_classifier_adapter_is_what_peft_saves_for_seq_cls_with_the_head_as_modules_to_save(tmp_path, arch):
    model, lora, tok = adapted_classifier(arch)
    base_dir, adapter_dir = export_both(model, lora, tmp_path, tok)
    config = json.loads((adapter_dir / CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    # peft's own SEQ_CLS adapter for the same modules and ranks (it adds score to modules_to_save itself)
    peft_config = peft.LoraConfig(task_type="SEQ_CLS", r=config["r"], lora_alpha=config["lora_alpha"],
                                  target_modules=config["target_modules"], rank_pattern=config["rank_pattern"],
                                  fan_in_fan_out=arch == "gpt2")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft.get_peft_model(hf, peft_config).save_pretrained(tmp_path / "peft")
    assert shapes(adapter_dir) == shapes(tmp_path / "peft")
    with safe_open(adapter_dir / WEIGHTS, "pt") as f:
        assert torch.equal(f.get_tensor("base_model.model.score.weight"), model.classifier.weight)


def test_refuses_what_peft_cannot_load(tmp_path):
    plain = sharp_model(GPT2_STYLE)
    with pytest.raises(HFExportError, match="no LoRA adapters"):
        peft_adapter_files(plain, LoRAConfig())
    model, lora, _ = adapted_model("gpt2-k")
    with pytest.raises(ValueError, match="pass the LoRAConfig the model was adapted with"):
        peft_adapter_files(model, LoRAConfig(r=R, alpha=2 * ALPHA, targets=["k"]))
    model.blocks[0].attn.qkv.merge()
    with pytest.raises(HFExportError, match="merged"):
        export_peft(model, lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A classifier's head trains whole in a LoRA run; a low-rank update on top of it is refused, with the fix.
    with pytest.raises(ConfigError, match=r"model.head: classify.*trains whole: drop head from lora.targets"):
        apply_lora(sharp_model(dict(GPT2_STYLE, head="classify", num_labels=3)), LoRAConfig(targets=["q", "head"]))


# ------------------------------------------------------------------------- a LoRA classifier run, end to end
def classify_data(root, arch: str):
    """A sharp language model (byte vocabulary) saved as ROOT/base, and ROOT/data: `prepare --task classify` data
    on its tokenizer. Returns (base, data)."""
    tok = byte_tokenizer()
    tok.save(root / "tokenizer.json")
    base = sharp_model(dict(CLASSIFIERS[arch], vocab_size=tok.vocab_size))
    save_checkpoint(root / "base", 0, base, None, RunConfig(model=base.config), {"tokens_seen": 0},
                    root / "tokenizer.json")
    records = [{"text": f"{['so', 'it was', 'a day'][i % 3]} {['good', 'bad'][i % 2]} {i}",
                "label": ["pos", "neg"][i % 2]} for i in range(40)]
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["prepare", str(root / "records.jsonl"), "--task", "classify", "--tokenizer", str(root / "base"),
                 "--out", str(root / "data"), "--split", "0.8,0.1,0.1"]) == 0
    return root / "base", root / "data"


def lora_classifier_run(root, arch: str):
    """A LoRA classifier trained by lmforge's Trainer on classify_data (q, v, o, mlp at r=4; its head trained whole).
    Returns the run directory."""
    base, data = classify_data(root, arch)
    lora = {"lora.r": R, "lora.alpha": ALPHA, "lora.targets": "q,v,o,mlp", "train.max_steps": 6,
            "train.save_interval": 6, "optim.lr": 1e-2}
    config = tiny_config(root / "run", **lora, **{"data.path": data, "train.init_from": base})
    Trainer(config, progress=False, tensorboard=False).fit()
    return root / "run"


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_export_of_a_lora_classifier_run_gives_base_and_seq_cls_adapter_or_one_merged_classifier(tmp_path, arch):
    run = lora_classifier_run(tmp_path, arch)
    tok = byte_tokenizer()
    ckpt, _ = verified_checkpoint(run)
    adapted = load_adapted_lora(ckpt, read_run_config(ckpt))  # what the run trained: adapters unmerged, its head
    ids = torch.randint(3, tok.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ids[1, 12:] = tok.pad_id
    ids[2, 5:] = tok.pad_id
    mask = ids != tok.pad_id
    with torch.no_grad():
        expected = adapted(ids, attention_mask=mask)  # (3, 2)

    def scores(hf_model) -> torch.Tensor:
        with torch.no_grad():
            return hf_model.eval()(ids, attention_mask=mask.long()).logits

    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "adapter" / CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "adapter" / WEIGHTS, "pt") as f:
        trained_head = f.get_tensor("base_model.model.score.weight")
    with torch.no_grad():
        base.score.weight.copy_(trained_head)  # the base with the trained head but no adapters: they still matter
    assert (scores(base) - expected).abs().max() > 1e-3
    tuned = peft.PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf"), tmp_path / "hf" / "adapter")
    assert (scores(tuned) - expected).abs().max() <= TOLERANCE
    assert main(["export", str(run), "--format", "hf", "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == ("GPT2ForSequenceClassification" if arch == "gpt2"
                                     else "LlamaForSequenceClassification")
    assert not (tmp_path / "merged" / "adapter").exists()
    assert (scores(merged) - expected).abs().max() <= TOLERANCE


def test_lora_head_target_on_a_classifier_is_one_line_and_writes_nothing(tmp_path, capsys):
    base, data = classify_data(tmp_path, "gpt2")
    capsys.readouterr()
    code = main(["train", "--data", str(data), "--run-dir", str(tmp_path / "head"), "--train.init_from", str(base),
                 "--lora.targets", "q,head", "--train.device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "classifier (model.head: classify)" in err and "drop head from lora.targets" in err
    assert not (tmp_path / "head").exists()


@pytest.mark.parametrize("case", ["gpt2-qvo-mlp", "llama-qvo-mlp"])
def test_an_rslora_adapter_exports_with_its_scale_alpha_over_sqrt_r(tmp_path, case):
    """lora.rslora: scale alpha / sqrt(r) = 3; written as plain LoRA's alpha for each module's rank (c_attn holds
    two adapters, rank 2r), peft scales every module by 3 and computes the same logits."""
    options, targets, _ = CASES[case]
    lora = LoRAConfig(r=R, alpha=ALPHA, targets=targets, rslora=True)
    model = random_adapters(apply_lora(sharp_model(options), lora))
    base_dir, adapter_dir = export_both(model, lora, tmp_path)
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                            adapter_dir).eval()
    scales = [m.scaling["default"] for name, m in loaded.named_modules() if hasattr(m, "lora_A")]
    assert scales and scales == pytest.approx([3.0] * len(scales))
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    assert (logits(loaded, ids) - logits(model, ids)).abs().max() <= TOLERANCE
