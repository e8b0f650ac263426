"""lora.init pissa and olora (peft's init_lora_weights): adapters start on each weight's principal directions (its
top-r singular vectors, or its QR decomposition) while the model starts as its base, as peft starts them; training,
resuming, merging and the PEFT export (rank 2r: B A and -B0 A0, peft's own conversion) keep what they compute."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import save_file

from lmforge.checkpoint import load_for_inference, save_checkpoint
from lmforge.config import LoRAConfig, ModelConfig, RunConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.interop.hf_export import export_hf
from lmforge.interop.peft_export import CONFIG, PREFIX, WEIGHTS, peft_adapter_files
from lmforge.lora import Adapter, apply_lora, initial_adapters, merge_lora
from lmforge.model import GPT
from lmforge.train import Trainer
from test_tasks import make_base, prepare, reverse_records, write_jsonl
from tiny_training import resumed_copy, step_losses, tiny_config

LLAMA = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm", mlp="swiglu",
             pos_encoding="rope", bias=False, tie_embeddings=False, rope_theta=20000.0)
HF = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[GPT, Path]:
    """A random Llama-style model and its transformers export."""
    root = tmp_path_factory.mktemp("lora-init")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**LLAMA)).eval()
    ckpt = save_checkpoint(root / "base", 0, model, None, RunConfig(model=model.config), {"tokens_seen": 0})
    return model, export_hf(ckpt, root / "hf")


def adapted(model: GPT, init: str) -> GPT:
    return apply_lora(copy.deepcopy(model), LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o"], init=init)).eval()


def peft_model(hf_dir: Path, init) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF, init_lora_weights=init, lora_dropout=0.0)
    return peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), config).eval()


def their_adapters(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module name: (lora_A, lora_B)} of a PeftModel."""
    return {name[len(PREFIX):]: (m.lora_A["default"].weight, m.lora_B["default"].weight)
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def our_adapters(model: GPT, init: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module name: (lora_A, lora_B)} of lmforge's model as its PEFT export writes them: the first term, B A."""
    weights = peft_adapter_files(model, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o"], init=init))[WEIGHTS]
    return {key[len(PREFIX):-len(".lora_A.weight")]: (weights[key][:4], weights[key.replace("lora_A", "lora_B")][:, :4])
            for key in weights if key.endswith("lora_A.weight")}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_start_as_peft_starts_them_and_the_model_as_its_base(base, init):
    model, hf_dir = base
    ours, theirs = adapted(model, init), peft_model(hf_dir, init)
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx) - model(idx)).abs().max() <= 1e-5  # B0 A0 taken off again: the base
        assert (ours(idx) - theirs(idx).logits).abs().max() <= 1e-4
    mine, peft_own = our_adapters(ours, init), their_adapters(theirs)
    assert set(mine) == set(peft_own) and len(mine) == 8
    for name, (A, B) in peft_own.items():  # peft's A and B, also where the export permutes q and k rows for RoPE
        assert torch.allclose(mine[name][0], A, atol=1e-5) and torch.allclose(mine[name][1], B, atol=1e-5), name


def test_pissa_starts_with_each_weights_best_rank_r_part():
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    A0, B0 = initial_adapters(weight, 4, 2.0, "pissa")
    S = torch.linalg.svdvals(weight)
    assert torch.allclose(torch.linalg.matrix_norm(weight - 2.0 * B0 @ A0) ** 2, (S[4:] ** 2).sum(), rtol=1e-4)
    A0, B0 = initial_adapters(weight, 4, 2.0, "olora")  # OLoRA: Q's orthonormal columns, R's rows
    assert torch.allclose(B0.T @ B0, torch.eye(4), atol=1e-5) and torch.allclose(torch.triu(A0), A0)
    with pytest.raises(ConfigError, match="takes r=20 directions of a \\(24, 16\\) weight"):
        initial_adapters(weight, 20, 2.0, "pissa")


def test_pissa_niter_approaches_the_best_rank_r_part_with_more_iterations_and_starts_at_the_base(base):
    """lora.pissa_niter (peft's pissa_niter_K): torch.svd_lowrank's randomized top r, near the best at few iterations
    on a random weight (flat spectrum: the hard case), nearer with more; the model still starts as its base."""
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    best = (torch.linalg.svdvals(weight)[4:] ** 2).sum()
    excess = []
    for niter in (0, 2, 16):
        torch.manual_seed(1)
        A0, B0 = initial_adapters(weight, 4, 2.0, "pissa", niter)
        excess.append(float(torch.linalg.matrix_norm(weight - 2.0 * B0 @ A0) ** 2 / best - 1))
    assert 0 < excess[2] < excess[1] < excess[0] < 0.2 and excess[2] < 0.005
    model, _ = base
    fast = apply_lora(copy.deepcopy(model), LoRAConfig(r=4, alpha=8, targets=["q", "v"], init="pissa",
                                                       pissa_niter=4)).eval()
    exact = apply_lora(copy.deepcopy(model), LoRAConfig(r=4, alpha=8, targets=["q", "v"], init="pissa")).eval()
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (fast(idx) - model(idx)).abs().max() <= 1e-5  # B0 A0 taken off again: the base
    residual = {}  # of each model's q slice, after its start s B0 A0 is taken out
    for name, m in (("fast", fast), ("exact", exact)):
        layer = m.blocks[0].attn.qkv
        q = layer.lora["q"]
        residual[name] = float(torch.linalg.matrix_norm(layer.weight[:q.size] - layer.scale * q.B0 @ q.A0) ** 2)
    assert residual["exact"] < residual["fast"] < 1.05 * residual["exact"]
    with pytest.raises(ConfigError, match="lora.pissa_niter=4 sets how PiSSA's SVD is computed, and lora.init is "
                                          "default"):
        LoRAConfig(pissa_niter=4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapters_compute_what_peft_computes_and_export_to_the_unchanged_base(base, init, tmp_path):
    model, hf_dir = base
    ours, theirs = adapted(model, init), peft_model(hf_dir, init)
    with torch.no_grad():  # train them alike: the same new A and B on both sides (peft's rows where they differ)
        for adapter in (m for m in ours.modules() if isinstance(m, Adapter)):
            adapter.A.add_(0.1 * torch.randn_like(adapter.A))
            adapter.B.add_(0.1 * torch.randn_like(adapter.B))
        mine = our_adapters(ours, init)
        for name, (A, B) in their_adapters(theirs).items():
            A.copy_(mine[name][0])
            B.copy_(mine[name][1])
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours(idx)
        assert (logits - model(idx)).abs().max() > 1e-2  # trained: no longer the base
        assert (logits - theirs(idx).logits).abs().max() <= 1e-4  # peft: W - s B0 A0 + s B A
        files = peft_adapter_files(ours, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o"], init=init))
        assert files[CONFIG]["r"] == 8 and files[CONFIG]["lora_alpha"] == 16  # rank 2r, the same scale
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / CONFIG).write_text(json.dumps(files[CONFIG]))
        save_file(files[WEIGHTS], str(tmp_path / "adapter" / WEIGHTS))
        exported = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                                                  tmp_path / "adapter").eval()
        assert (logits - exported(idx).logits).abs().max() <= 1e-4  # a plain LoRA on the base as it is
        assert (merge_lora(ours)(idx) - logits).abs().max() <= 1e-4


def test_a_pissa_run_starts_at_its_base_trains_and_resumes_exactly(tmp_path):
    base = make_base(tmp_path)
    assert prepare(base, tmp_path / "sft", write_jsonl(tmp_path / "r.jsonl", reverse_records(120))) == 0
    values = {"data.path": str(tmp_path / "sft"), "train.init_from": str(base), "train.max_steps": 6,
              "train.batch_size": 8, "train.save_interval": 3, "lora.r": 4, "lora.targets": "q,v,mlp",
              "lora.init": "pissa"}
    full = Trainer(tiny_config(tmp_path / "full", **values), progress=False, tensorboard=False)
    reference = Trainer(tiny_config(tmp_path / "plain", **{**values, "lora.init": "default"}), progress=False,
                        tensorboard=False)
    x = next(iter(full.val_batches))[0]
    with torch.no_grad():
        assert (full.raw_model(x) - reference.raw_model(x)).abs().max() <= 1e-5  # both start as the base
    full.fit()
    losses = [loss for _, loss in full.history]
    assert losses[-1] < losses[0]
    resumed = resumed_copy(tmp_path / "full", 3,
                           tiny_config(tmp_path / "resumed", **values, **{"train.resume": "auto"}))
    assert [loss for _, loss in resumed.history] == [loss for step, loss in full.history if step > 3]
    assert step_losses(tmp_path / "resumed")[6] == step_losses(tmp_path / "full")[6]
    merged, _, config = load_for_inference(tmp_path / "full")
    assert config.lora.init == "pissa"
    with torch.no_grad():
        assert (merged(x) - full.raw_model.eval()(x)).abs().max() <= 1e-4


def test_init_with_dora_and_a_changed_init_when_continuing_are_one_line():
    from lmforge.config import with_init_sections

    with pytest.raises(ConfigError, match="lora.init=pissa with lora.dora is not supported"):
        LoRAConfig(init="pissa", dora=True)
    with pytest.raises(ConfigError, match="lora.init=olora"):
        LoRAConfig(init="olora", dora=True)
    def config(**lora: object) -> RunConfig:
        return RunConfig(train=TrainConfig(init_from="runs/base"), lora=LoRAConfig(**lora))

    run = config(init="pissa")  # a PiSSA run, continued
    assert with_init_sections(config(init="pissa", dropout=0.1), run, "runs/p").lora.init == "pissa"
    with pytest.raises(ConfigError, match="drop lora.r/alpha/targets/dora/init"):
        with_init_sections(config(init="olora"), run, "runs/p")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_gguf_adapter_of_moved_adapters_applied_as_llama_cpp_does_is_the_merged_model(base, init):
    pytest.importorskip("gguf")
    from test_gguf_lora import check_against_merged

    model, _ = base
    ours = adapted(model, init)
    with torch.no_grad():
        for adapter in (m for m in ours.modules() if isinstance(m, Adapter)):
            adapter.A.add_(0.1 * torch.randn_like(adapter.A))
            adapter.B.add_(0.1 * torch.randn_like(adapter.B))
    tensors = check_against_merged(ours, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o"], init=init), "llama",
                                   model)
    assert all(t.shape[1] == 8 for name, t in tensors.items() if name.endswith(".lora_b"))  # rank 2r: B A and -B0 A0
