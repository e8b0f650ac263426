"""Guards on Qwen2 support and GGUF's named pre-tokenizer rules that the main tests leave open: Qwen2's config.json
(no sliding window, read back; sliding layers refused), a Llama-style model with biases everywhere staying llama,
a Qwen2 classifier's architecture, llama.cpp's other names of each rule and its default add_bos_token per rule,
a qwen2 GGUF file without its q/k/v biases refused, and an exported mask token written into tokenizer.json itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_export import MAKERS, fields  # noqa: E402
from test_gguf_import import rewrite  # noqa: E402
from test_gguf_pretokenizers import BOS, TEXTS, as_lmforge, hf_tokenizer  # noqa: E402
from test_interop import CORPUS, LLAMA_STYLE, lmforge_run, max_diff  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lmforge.checkpoint import load_for_inference, save_checkpoint  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import ModelConfig, RunConfig  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.generate import prompt_ids  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf  # noqa: E402
from lmforge.interop.hf_export import export_hf  # noqa: E402
from lmforge.interop.hf_llama import from_hf_config, to_hf_config  # noqa: E402
from lmforge.interop.hf_import import import_hf  # noqa: E402
from lmforge.tokenizer import byte_tokenizer, train_bpe  # noqa: E402

TOLERANCE = 1e-5
QWEN2_STYLE = {**LLAMA_STYLE, "qkv_bias": True}


def test_qwen2s_config_json_says_no_sliding_window_reads_back_and_sliding_layers_are_refused():
    config = ModelConfig(vocab_size=300, **QWEN2_STYLE)
    hf = to_hf_config(config)
    assert (hf["model_type"], hf["architectures"], hf["use_sliding_window"]) == ("qwen2", ["Qwen2ForCausalLM"], False)
    theirs = transformers.Qwen2Config(**hf)
    assert theirs.layer_types == ["full_attention"] * config.n_layer and theirs.sliding_window is None
    assert from_hf_config(hf) == config
    assert from_hf_config(theirs) == config  # transformers' own dict: layer_types all full_attention
    # layer_types naming sliding layers is sliding attention whatever use_sliding_window says: refused
    for layer_types in (["full_attention", "sliding_attention"], ["sliding", "full_attention"]):
        with pytest.raises(ConfigError, match="use_sliding_window=true .* no lmforge equivalent"):
            from_hf_config({**hf, "layer_types": layer_types, "sliding_window": 16})
    with pytest.raises(ConfigError, match="model_type='mistral' is not llama, qwen2 or qwen3"):
        from_hf_config({**hf, "model_type": "mistral"})  # called directly, not through import's dispatch
    # a Llama config with attention biases is biases everywhere, not Qwen2's q/k/v-only layout
    llama = from_hf_config(to_hf_config(ModelConfig(vocab_size=300, **{**LLAMA_STYLE, "bias": True})))
    assert (llama.bias, llama.qkv_bias) == (True, False)


def test_a_llama_style_model_with_biases_everywhere_stays_llama_though_qkv_bias_is_set(tmp_path):
    tok = byte_tokenizer()
    run = lmforge_run(tmp_path, tok, **{**QWEN2_STYLE, "bias": True})
    ours, _, _ = load_for_inference(run, "cpu")
    assert ours.blocks[0].attn.proj.bias is not None and ours.blocks[0].mlp.fc.bias is not None
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["attention_bias"], config["mlp_bias"]) == ("llama", True, True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, tok.vocab_size, (2, 30))
    assert max_diff(ours, theirs, ids) <= TOLERANCE
    assert fields(export_gguf(run, tmp_path / "m.gguf"))["general.architecture"] == "llama"


def test_a_qwen2_classifier_exports_as_qwen2_for_sequence_classification_with_the_same_logits(tmp_path):
    tok = byte_tokenizer()
    run = lmforge_run(tmp_path, tok, head="classify", num_labels=3, **QWEN2_STYLE)
    model, _, _ = load_for_inference(run, "cpu")
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    save_checkpoint(run, 8, model, None, RunConfig(model=model.config), {"tokens_seen": 0}, tmp_path / "tokenizer.json")
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForSequenceClassification"])
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "Qwen2ForSequenceClassification"
    ids = torch.randint(3, tok.vocab_size, (2, 20))
    ids[1, 9:] = tok.pad_id
    mask = ids != tok.pad_id
    model, _, _ = load_for_inference(run, "cpu")
    with torch.no_grad():
        ours, expected = model(ids, attention_mask=mask), theirs(ids, attention_mask=mask.long()).logits
    assert (ours - expected).abs().max().item() <= TOLERANCE and expected.abs().max() > 0.5


# llama.cpp's names for each rule, and whether llama.cpp adds bos to every text when the file does not say
NAMES = {"gpt-2": (["gpt-2"], False), "llama-bpe": (["llama-bpe", "llama3", "llama-v3"], True),
         "smollm": (["smollm", "starcoder", "refact"], False), "qwen2": (["qwen2"], False)}


@pytest.mark.parametrize("rule", list(NAMES))
def test_every_name_of_a_rule_imports_with_llama_cpps_default_bos_for_it(tmp_path, rule):
    if rule == "gpt-2":  # lmforge's own byte-level BPE: GPT-2's rule, its start token added to every text
        tok = MAKERS["bpe"]()
        start = tok.start_id
    else:
        hf = hf_tokenizer(rule)
        tok, start = as_lmforge(hf), hf.token_to_id(BOS)
    run = lmforge_run(tmp_path, tok, **LLAMA_STYLE)
    path = export_gguf(run, tmp_path / "m.gguf")
    assert (fields(path)["tokenizer.ggml.pre"], fields(path)["tokenizer.ggml.add_bos_token"]) == (rule, True)
    names, adds_bos = NAMES[rule]
    for name in names:
        renamed = rewrite(path, tmp_path / f"{name}.gguf", {"tokenizer.ggml.pre": name},
                          drop=("tokenizer.ggml.add_bos_token",))
        _, back, _ = load_for_inference(import_gguf(renamed, tmp_path / f"back-{name}"), "cpu")
        assert back.start_id == (start if adds_bos else None), name
        for text in TEXTS:
            want = prompt_ids(tok, text)
            assert prompt_ids(back, text) == (want if adds_bos else want[1:]), (name, text)


def test_a_qwen2_gguf_without_its_q_k_v_biases_is_refused_writing_nothing(tmp_path, capsys):
    run = lmforge_run(tmp_path, byte_tokenizer(), **QWEN2_STYLE)
    path = export_gguf(run, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors if t.name.endswith(".bias")} == {
        f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"}
    stripped = tmp_path / "stripped.gguf"
    writer = gguf.GGUFWriter(str(stripped), "qwen2")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if not t.name.endswith(".bias"):
            writer.add_tensor(t.name, t.data, raw_shape=tuple(int(n) for n in reversed(t.shape)),
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["import", str(stripped), "--out", str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip()
    assert "biases on nothing only" in err and "qwen2 (llama with q/k/v biases)" in err and "\n" not in err, err
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_an_exported_mask_token_is_in_tokenizer_json_itself_once_at_its_id(tmp_path, kind):
    tok = (train_bpe(CORPUS, 400) if kind == "bpe" else byte_tokenizer()).with_mask_token("<MASK>")
    run = lmforge_run(tmp_path, tok, **LLAMA_STYLE)
    export_hf(run, tmp_path / "hf")
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    ids = [t["id"] for t in spec["added_tokens"]]
    assert len(ids) == len(set(ids)) and {0, 1, 2, tok.mask_id} <= set(ids)
    # the tokenizers library reads tokenizer.json alone (as lmforge's own import does): the mask is one id there
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert hf.token_to_id("<MASK>") == tok.mask_id and hf.get_vocab_size() == tok.vocab_size
    assert hf.encode("ab <MASK> cd").ids == [*prompt_ids(tok, "ab "), tok.mask_id, *tok.encode(" cd")]
    if kind == "bpe":  # byte-level BPE imports back (lmforge's byte kind exports with byte fallback, which it does not)
        _, back, _ = load_for_inference(import_hf(tmp_path / "hf", tmp_path / "back"), "cpu")
        assert back.encode("ab <MASK> cd") == tok.encode("ab ") + [tok.mask_id] + tok.encode(" cd")
