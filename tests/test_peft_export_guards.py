"""PEFT export where every adapted module holds more than one lmforge adapter: the adapter config's default r is
then a multiple of lmforge's r, and lora_alpha must grow with it so that peft's lora_alpha / r stays lmforge's
alpha / r (the cases of tests/test_peft.py all have a module of rank r, where the two coincide). And --force never
replaces an adapter that peft itself saved."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from lmforge.interop.hf_export import HFExportError  # noqa: E402
from lmforge.interop.peft_export import CONFIG, WEIGHTS, export_peft, peft_adapter_files  # noqa: E402
from lmforge.lora import LoRAConfig, apply_lora  # noqa: E402
from test_peft import ALPHA, GPT2_STYLE, R, TOLERANCE, export_both, logits, random_adapters, sharp_model  # noqa: E402


def test_a_gpt2_adapter_on_q_and_v_only_has_rank_2r_and_alpha_2alpha_and_peft_gives_its_logits(tmp_path):
    lora = LoRAConfig(r=R, alpha=ALPHA, targets=["q", "v"])
    model = random_adapters(apply_lora(sharp_model(GPT2_STYLE), lora))
    config = peft_adapter_files(model, lora)[CONFIG]
    assert config["target_modules"] == ["attn.c_attn"] and config["rank_pattern"] == {}
    assert config["r"] == 2 * R and config["lora_alpha"] * R == pytest.approx(2 * R * ALPHA)
    base_dir, adapter_dir = export_both(model, lora, tmp_path)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    ours = logits(model, ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (logits(base, ids) - ours).abs().max() > 1.0  # the adapters change the logits a lot
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert (logits(theirs, ids) - ours).abs().max() <= TOLERANCE


def test_force_never_replaces_a_peft_adapter_that_lmforge_did_not_write(tmp_path):
    """An adapter peft saved itself (adapter_model.safetensors without lmforge's metadata) is the user's work:
    export_peft refuses to replace it, --force or not, and leaves it as it was."""
    lora = LoRAConfig(r=R, alpha=ALPHA, targets=["q", "v"])
    model = random_adapters(apply_lora(sharp_model(GPT2_STYLE), lora))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, str(theirs / WEIGHTS),
              metadata={"format": "pt"})  # as peft's save_pretrained writes it
    (theirs / CONFIG).write_text("{}")
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    for force in (False, True):
        with pytest.raises(HFExportError, match="is not a PEFT adapter written by lmforge"):
            export_peft(model, lora, theirs, force=force)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
