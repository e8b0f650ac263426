"""`lmforge merge` of a fine-tuned LoRA checkpoint keeps what the checkpoint says about itself: the task (and its
prompt template) it was fine-tuned for, its step, and that it is a merge output; the merged weights give the
adapted model's logits."""

from __future__ import annotations

import json

import torch

from lmforge.checkpoint import latest_checkpoint, load_for_inference, read_task, save_checkpoint
from lmforge.config import ModelConfig, RunConfig, TrainConfig
from lmforge.interop.lora_merge import is_merge_output, merge_checkpoint
from lmforge.lora import LoRAConfig, apply_lora, base_fingerprint, lora_parameters
from lmforge.model import GPT

TASK = {"task": "sft", "template": {"name": "alpaca", "prompt": "### Instruction:\n{prompt}\n\n### Response:\n"}}


def lora_checkpoint(root, task):
    """A base checkpoint and a LoRA checkpoint (step 7) of random adapters on it, as a LoRA run writes them."""
    config = ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    base_model = GPT(config)
    base = save_checkpoint(root / "base", 3, base_model, None, RunConfig(model=config), {"tokens_seen": 0})
    lora = LoRAConfig(r=2, alpha=4.0, targets=["q", "v"])
    model = apply_lora(base_model, lora)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.3)
    state = {"tokens_seen": 0, "base": {"path": str(base), "fingerprint": base_fingerprint(model)}}
    if task is not None:
        state["task"] = task
    save_checkpoint(root / "lora", 7, model, None,
                    RunConfig(model=config, lora=lora, train=TrainConfig(init_from=str(base))), state)
    return model.eval()


def test_a_merged_fine_tune_keeps_its_task_its_step_and_the_adapted_logits(tmp_path):
    adapted = lora_checkpoint(tmp_path, TASK)
    merged_ckpt = merge_checkpoint(tmp_path / "lora", tmp_path / "merged")
    assert merged_ckpt.name == "step-00000007" and latest_checkpoint(tmp_path / "merged") == merged_ckpt
    assert read_task(merged_ckpt) == TASK  # generate and serve apply its prompt template to a prompt
    assert is_merge_output(tmp_path / "merged") and not is_merge_output(tmp_path / "lora")
    state = json.loads((merged_ckpt / "state.json").read_text())
    assert state["merged_from"]["lora"]["r"] == 2
    merged, _, config = load_for_inference(merged_ckpt)
    assert config.lora is None
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max() <= 1e-5


def test_a_merged_language_model_run_has_no_task(tmp_path):
    lora_checkpoint(tmp_path, None)
    assert read_task(merge_checkpoint(tmp_path / "lora", tmp_path / "merged")) is None
