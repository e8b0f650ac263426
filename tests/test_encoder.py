"""The BERT-style encoder (model.causal: false): bidirectional attention from the same blocks, BERT's masking,
masked-language-model training that learns and resumes exactly, fill-mask, and classification from the start
token; eval by MLM loss and masked accuracy, ONNX export, LoRA and merge; and the refusals (generate, HF export
and serving of an encoder, mlm on a decoder, data without a mask token)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data.batches import IGNORE_INDEX, MaskedBatches, TokenBatches, mask_tokens, pad_labelled_examples
from lmforge.data.batches import Examples
from lmforge.errors import ConfigError, DataError
from lmforge.generate import MaskFiller, load
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train import Trainer
from tiny_training import step_losses, tiny_config

ENCODER = {"model.causal": "false", "train.objective": "mlm"}


def encoder_config(**kw) -> ModelConfig:
    values = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, causal=False)
    values.update(kw)
    return ModelConfig(**values)


# --------------------------------------------------------------------------------------------- the model
def test_every_position_of_an_encoder_sees_the_whole_text_and_a_decoder_only_the_past():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (1, 10))
    later = x.clone()
    later[0, 7] = (later[0, 7] + 1) % 64  # change one token near the end
    encoder, decoder = GPT(encoder_config()).eval(), GPT(encoder_config(causal=True)).eval()
    with torch.no_grad():
        assert not torch.allclose(encoder(x)[0, :7], encoder(later)[0, :7])  # earlier positions see it
        torch.testing.assert_close(decoder(x)[0, :7], decoder(later)[0, :7], rtol=0, atol=0)  # they do not


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_the_fused_encoder_equals_the_formula_and_padding_changes_no_real_position(pos_encoding):
    torch.manual_seed(0)
    fused = GPT(encoder_config(pos_encoding=pos_encoding)).eval()
    reference = GPT(encoder_config(pos_encoding=pos_encoding, attention="reference")).eval()
    reference.load_state_dict(fused.state_dict())
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
        # Row 1 holds 6 real tokens then 3 pads (right) or 3 pads then them (left): its real positions equal
        # the 6 tokens alone, whichever side the pads are on.
        alone = fused(x[1:, :6])[0]
        right = torch.ones(2, 9, dtype=torch.bool)
        right[1, 6:] = False
        torch.testing.assert_close(fused(x, attention_mask=right)[1, :6], alone, rtol=1e-5, atol=1e-5)
        left_x = torch.cat([x[1:, 6:], x[1:, :6]], dim=1)
        left = torch.zeros(1, 9, dtype=torch.bool)
        left[0, 3:] = True
        torch.testing.assert_close(reference(left_x, attention_mask=left)[0, 3:], alone, rtol=1e-5, atol=1e-5)


def test_an_encoder_classifier_reads_its_start_token_the_same_with_left_or_right_padding():
    torch.manual_seed(0)
    model = GPT(encoder_config(head="classify", num_labels=3)).eval()
    tokens = np.array([0, 10, 11, 12, 1, 0, 13, 1], dtype=np.int32)  # two examples: 5 and 3 tokens
    examples = Examples(tokens, np.array([0, 5, 8]), None, np.array([0, 2]))
    with torch.no_grad():
        right = model(*(lambda x, y, m: (x,))(*pad_labelled_examples(examples, np.arange(2), 2)),
                       attention_mask=pad_labelled_examples(examples, np.arange(2), 2)[2])
        x, _, mask = pad_labelled_examples(examples, np.arange(2), 2, side="left")
        left = model(x, attention_mask=mask)
        alone = model(torch.tensor([[0, 13, 1]]))
        changed = model(torch.tensor([[0, 13, 14]]))  # a later token changes what the start token sees
    torch.testing.assert_close(right, left, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right[1:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, changed)
    assert model.summary_position(mask, 2, mask.shape[1]).tolist() == [0, 2]  # the first real column


def test_an_encoder_has_no_kv_cache():
    from lmforge.model import KVCache

    model = GPT(encoder_config())
    with pytest.raises(ValueError, match="does not generate"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache.for_model(model, 1))


# ------------------------------------------------------------------------------------------------ masking
def test_bert_masking_chooses_15_percent_and_replaces_80_10_10():
    x = torch.randint(0, 99, (200, 500))  # the mask id is 99, the last of 100
    inputs, labels = mask_tokens(x, 99, 100, 0.15, np.random.default_rng(0))
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    assert abs(n / x.numel() - 0.15) < 0.005
    assert torch.equal(labels[chosen], x[chosen]) and torch.equal(inputs[~chosen], x[~chosen])
    masked = (inputs == 99) & chosen
    kept = (inputs == x) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # A random replacement equals the original with chance 1/99: the "unchanged" share is 10% plus that.
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 99)) < 0.01
    assert not ((inputs == 99) & ~chosen).any()  # the mask id appears only where chosen


def test_masked_batches_depend_only_on_the_stream_position_so_they_resume_exactly():
    tokens = np.arange(5000) % 97
    def stream():
        return MaskedBatches(TokenBatches(tokens, 16, 4, seed=3), 99, 100, 0.15, seed=3)
    a = stream()
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    after = [a.next_batch() for _ in range(2)]
    b = stream()
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, [b.next_batch() for _ in range(2)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    first, second = stream().next_batch(), after[0]
    assert not torch.equal(first[1] != IGNORE_INDEX, second[1] != IGNORE_INDEX)  # each batch masks anew


# ------------------------------------------------------------------------------------- training, fill-mask
def corpus(root: Path, n: int = 400, seed: int = 0) -> Path:
    """Sentences of a small grammar: 'the cat sat on the mat .' - a masked letter is easy to infer from both
    sides (the rest of its word), hard from one side only."""
    rng = random.Random(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my hen"], ["sat on", "ran to", "hid by"], ["the mat", "a log", "my bed"]
    root.mkdir(parents=True, exist_ok=True)
    for f in range(4):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(n // 4)]
        (root / f"part{f}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    assert main(["prepare", str(corpus(root / "corpus")), "--tokenizer", "char", "--mask-token", "--out",
                 str(root / "data"), "--split", "0.5,0.25,0.25", "--no-progress"]) == 0
    return root / "data"


# RoPE: an encoder has no causal mask to tell left from right, and learns relative positions from RoPE far
# sooner than from learned absolute ones (here: masked accuracy 0.33 after 1,000 steps with learned positions).
MLM_RUN = {**ENCODER, "train.max_steps": 400, "train.eval_interval": 200, "train.save_interval": 200,
           "train.keep_last": 3, "model.block_size": 32, "model.pos_encoding": "rope", "train.batch_size": 32,
           "optim.lr": 1e-2, "optim.schedule": "constant", "optim.warmup_steps": 0}


@pytest.fixture(scope="module")
def encoder_run(mlm_data, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("enc") / "run"
    summary = Trainer(tiny_config(run, **{**MLM_RUN, "data.path": str(mlm_data)}), progress=False,
                      tensorboard=False).fit()
    return run, summary


def test_the_mask_token_takes_the_last_id_and_text_never_produces_it(mlm_data):
    tok = Tokenizer.load(mlm_data / "tokenizer.json")
    assert tok.mask_id == tok.vocab_size - 1 and tok.mask_token == "<MASK>"
    assert tok.mask_id not in tok.encode("a <MASK> b")
    assert json.loads((mlm_data / "manifest.json").read_text())["vocab_size"] == tok.vocab_size


def test_masked_language_model_training_learns_to_fill_masks(encoder_run, mlm_data):
    run, summary = encoder_run
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [e["val_masked_accuracy"] for e in evals if e["kind"] == "eval"]
    tokens = np.fromfile(mlm_data / "val.bin", dtype=np.uint16)
    most_frequent = np.bincount(tokens).max() / len(tokens)  # always guessing the commonest token (a space)
    assert accuracy[-1] > most_frequent + 0.25, (accuracy, most_frequent)


def test_masked_language_model_training_resumes_bit_identically(encoder_run, mlm_data, tmp_path):
    run, _ = encoder_run
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-00000200", tmp_path / "resumed" / "checkpoints" / "step-00000200")
    Trainer(tiny_config(tmp_path / "resumed", **{**MLM_RUN, "data.path": str(mlm_data), "train.resume": "auto"}),
            progress=False, tensorboard=False).fit()
    full, resumed = step_losses(run), step_losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(201, 401)] == [full[s] for s in range(201, 401)]


def test_fill_mask_gives_the_softmax_of_the_encoder_at_each_mask(encoder_run, capsys):
    run, _ = encoder_run
    filler = load(str(run))
    assert isinstance(filler, MaskFiller)
    text = "the c<MASK>t sat on the m<MASK>t ."
    ranked = filler.fill_mask(text, top_k=3)
    ids = filler.encode(text)
    with torch.no_grad():
        logits = filler.model(torch.tensor([ids]))[0]
    where = [t for t, i in enumerate(ids) if i == filler.tokenizer.mask_id]
    assert len(ranked) == 2 and len(where) == 2
    for fills, t in zip(ranked, where):
        probs = torch.softmax(logits[t].float(), -1)
        probs[filler.tokenizer.mask_id] = 0
        top = probs.topk(3)
        assert [tok for tok, _ in fills] == [filler.tokenizer.token_text(int(i)) for i in top.indices]
        assert [p for _, p in fills] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert ranked[0][0][0] == "a"  # trained on the grammar: c?t is cat
    assert main(["fill-mask", str(run), "--text", text, "--top-k", "2", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["token"] for line in lines] == [fills[0][0] for fills in ranked]


@pytest.mark.parametrize("argv, message", [
    (["fill-mask", "RUN", "--text", "no mask here"], "holds no <MASK>"),
    (["fill-mask", "RUN", "--text", "x" * 40 + "<MASK>"], "more than the model's context"),
    (["generate", "RUN", "--prompt", "the"], "does not generate text"),
])
def test_an_encoder_refuses_what_it_cannot_do_in_one_line(encoder_run, capsys, argv, message):
    run, _ = encoder_run
    assert main([a.replace("RUN", str(run)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_fill_mask_on_a_decoder_is_refused(tmp_path, capsys):
    from tiny_training import write_base

    write_base(tmp_path)
    assert main(["fill-mask", str(tmp_path / "base"), "--text", "a <MASK>"]) == 2
    assert "not an encoder" in capsys.readouterr().err


@pytest.mark.parametrize("values, error, message", [
    ({"train.objective": "mlm"}, ConfigError, "set model.causal false"),
    ({"model.causal": "false"}, ConfigError, "set train.objective mlm"),
])
def test_an_objective_the_model_cannot_learn_honestly_is_refused(mlm_data, tmp_path, values, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny_config(tmp_path / "run", **{"data.path": str(mlm_data), **values}), progress=False,
                tensorboard=False)
    assert not (tmp_path / "run").exists()


def test_mlm_on_data_without_a_mask_token_is_refused(tmp_path):
    from tiny_training import write_prepared_data

    data = write_prepared_data(tmp_path / "data", {"train": ["hello " * 50], "val": ["hello " * 20]})
    with pytest.raises(DataError, match="--mask-token"):
        Trainer(tiny_config(tmp_path / "run", **{"data.path": str(data), **ENCODER}), progress=False, tensorboard=False)


def test_an_encoder_fine_tunes_into_a_classifier_through_the_task_path(encoder_run, tmp_path):
    """Classify data prepared with the encoder's tokenizer; the head reads the start token's hidden state."""
    run, _ = encoder_run
    rng = random.Random(0)
    records = [{"text": f"{rng.choice(['a', 'my', 'the'])} {animal}", "label": label}
               for animal, label in [("cat", "pet"), ("dog", "pet"), ("hen", "farm"), ("cow", "farm")] * 40]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert main(["prepare", str(tmp_path / "r.jsonl"), "--task", "classify", "--tokenizer", str(run), "--out",
                 str(tmp_path / "data"), "--keep-duplicates"]) == 0
    trainer = Trainer(tiny_config(tmp_path / "cls", **{"data.path": str(tmp_path / "data"), "train.init_from": str(run),
                                                       "train.max_steps": 80, "train.batch_size": 8,
                                                       "train.eval_interval": 20, "optim.lr": 1e-2}),
                      progress=False, tensorboard=False)
    trainer.fit()
    assert trainer.raw_model.config.causal is False and trainer.raw_model.config.head == "classify"
    assert trainer.val_metrics["val_accuracy"] >= 0.9, trainer.val_metrics


# ------------------------------------------------------------------ eval, export, serve, LoRA of an encoder
def test_eval_of_an_encoder_scores_masked_tokens_with_a_fixed_masking_and_no_perplexity(encoder_run, mlm_data,
                                                                                       capsys):
    """The MLM loss and masked accuracy over consecutive windows, each masked from (MASK_SEED, its start): equal
    to scoring the windows one by one, and the same whatever the batch size (a perplexity would measure copying)."""
    from lmforge.eval.perplexity import MASK_SEED, evaluate_checkpoint

    run, _ = encoder_run
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val", "--device", "cpu", "--batch-size", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "mlm" and "perplexity" not in result and "bits_per_byte" not in result
    again = evaluate_checkpoint(run, split="val", batch_size=16, device="cpu")
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-6)  # float rounding only
    assert again["masked_accuracy"] == result["masked_accuracy"]

    model, tok = load(str(run)).model, Tokenizer.load(mlm_data / "tokenizer.json")
    tokens = np.fromfile(mlm_data / "val.bin", dtype=np.uint16)
    T = model.config.block_size
    loss, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, len(tokens), T):  # the reference: one window at a time, masked as BERT does
            window = torch.from_numpy(tokens[s:s + T].astype(np.int64))[None]
            x, y = mask_tokens(window, tok.mask_id, tok.vocab_size, 0.15, np.random.default_rng([MASK_SEED, s]))
            logits = model(x)[0]
            chosen = y[0] != IGNORE_INDEX
            loss += torch.nn.functional.cross_entropy(logits[chosen], y[0][chosen], reduction="sum").item()
            hits += (logits[chosen].argmax(-1) == y[0][chosen]).sum().item()
            count += int(chosen.sum())
    assert result["masked_tokens"] == count and abs(count / len(tokens) - 0.15) < 0.03
    assert result["loss"] == pytest.approx(loss / count, rel=1e-5)
    assert result["masked_accuracy"] == hits / count
    most_frequent = np.bincount(tokens).max() / len(tokens)
    assert result["masked_accuracy"] > most_frequent + 0.25  # the trained encoder, scored honestly


def test_an_encoder_exports_to_onnx_with_its_bidirectional_logits(encoder_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run, _ = encoder_run
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "enc.onnx")]) == 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "enc.onnx"), options, providers=["CPUExecutionProvider"])
    model = load(str(run)).model
    torch.manual_seed(0)
    for shape in [(1, 5), (3, 32)]:  # batch and sequence axes are dynamic
        ids = torch.randint(0, model.config.vocab_size, shape)
        logits = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            assert abs(logits - model(ids).numpy()).max() <= 1e-4
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % model.config.vocab_size
    first, changed = (session.run(["logits"], {"input_ids": t.numpy()})[0] for t in (ids, later))
    assert abs(first[0, :-1] - changed[0, :-1]).max() > 1e-4  # earlier positions see the last token


def test_hf_export_of_an_encoder_is_refused_and_its_server_embeds_only(encoder_run, tmp_path):
    import httpx

    from lmforge.generate import TextEmbedder, load
    from lmforge.interop.hf_export import HFExportError, export_hf
    from lmforge.serve import ServeConfig, load_app
    from test_serve import running

    run, _ = encoder_run
    with pytest.raises(HFExportError, match="not a BertForMaskedLM.*--format onnx"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    filler = load(str(run))
    want = TextEmbedder(filler.model, filler.tokenizer).embed(["to be or not", "to be"])
    assert TextEmbedder(filler.model, filler.tokenizer).pooling == "mean"
    with running(load_app(str(run), ServeConfig(), device="cpu")) as url, httpx.Client(base_url=url) as client:
        got = client.post("/v1/embeddings", json={"input": ["to be or not", "to be"]}).json()["data"]
        assert torch.allclose(torch.tensor([d["embedding"] for d in got]), want, atol=1e-6)
        assert client.get("/v1/models").json()["data"][0]["task"] == "embed"
        assert client.get("/health").json()["status"] == "ok" and "lmforge_requests_total" in client.get(
            "/metrics").text
        assert "/v1/embeddings" in client.get("/").text
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
            r = client.post(path, json={"prompt": "x"})
            assert r.status_code == 400 and "is an encoder" in r.json()["error"]["message"], path
    with pytest.raises(ConfigError, match="and this model is an encoder: leave them out"):
        load_app(str(run), ServeConfig(prompt_lookup_num_tokens=3))


def test_an_encoders_server_fills_masks_as_the_library_does_in_hugging_faces_shape(encoder_run):
    """POST /v1/fill-mask: Hugging Face's fill-mask answer (per mask, top_k {score, token, token_str, sequence}) with
    the library's candidates (MaskFiller.fill_mask); one mask a list, two a list per mask, a list of texts a list per
    text; bad requests 422 (404 for another model); the API key guards it."""
    import httpx

    from lmforge.generate import load
    from lmforge.serve import ServeConfig, load_app
    from test_serve import running

    run, _ = encoder_run
    filler = load(str(run))
    one, two = "to be or not to <MASK>e", "<MASK>o be or not to <MASK>e"
    with running(load_app(str(run), ServeConfig(max_prompts=4), device="cpu")) as url, \
            httpx.Client(base_url=url) as client:
        got = client.post("/v1/fill-mask", json={"inputs": one, "parameters": {"top_k": 3}}).json()
        want = filler.fill_mask(one, top_k=3)[0]
        assert [(c["token_str"], c["score"]) for c in got] == [(t, pytest.approx(p, abs=1e-6)) for t, p in want]
        assert all(c["sequence"] == one.replace("<MASK>", c["token_str"]) and filler.tokenizer.token_text(c["token"])
                   == c["token_str"] for c in got)
        assert got[0]["score"] >= got[1]["score"] >= got[2]["score"]
        both = client.post("/v1/fill-mask", json={"inputs": two}).json()  # top_k 5 by default
        assert len(both) == 2 and all(len(m) == 5 for m in both)
        assert [[c["token_str"] for c in m] for m in both] == [[t for t, _ in m] for m in filler.fill_mask(two)]
        assert both[0][0]["sequence"] == both[0][0]["token_str"] + "o be or not to <MASK>e"  # the other mask stays
        assert both[1][0]["sequence"] == "<MASK>o be or not to " + both[1][0]["token_str"] + "e"
        listed = client.post("/v1/fill-mask", json={"inputs": [one, two]}).json()
        assert [c["token"] for c in listed[0]] == [c["token"] for c in client.post(
            "/v1/fill-mask", json={"inputs": one}).json()] and len(listed[1]) == 2
        for body, words in [({"inputs": "no mask here"}, "inputs[0]: the text holds no <MASK>"),
                            ({"inputs": one, "parameters": {"top_k": 0}}, "top_k"),
                            ({"inputs": one, "parameters": {"top_k": 101}}, "top_k"),
                            ({"inputs": [one] * 5}, "5 inputs; give 1 to 4"), ({"inputs": []}, "0 inputs"),
                            ({"inputs": "<MASK>" + "a" * 200}, "more than the model's context"),
                            ({"inputs": one, "model": "other"}, "'other' is not served here")]:
            r = client.post("/v1/fill-mask", json=body)
            assert r.status_code in (404, 422) and words in r.json()["error"]["message"], (body, r.text)
        assert "/v1/fill-mask" in client.get("/").text
    with running(load_app(str(run), ServeConfig(api_key="s3cret"), device="cpu")) as url, \
            httpx.Client(base_url=url) as client:
        assert client.post("/v1/fill-mask", json={"inputs": one}).status_code == 401
        assert client.post("/v1/fill-mask", json={"inputs": one},
                           headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_lora_on_an_encoder_trains_masks_and_merges_into_the_same_encoder(encoder_run, mlm_data, tmp_path):
    from lmforge.checkpoint import load_for_inference

    run, _ = encoder_run
    lora = tiny_config(tmp_path / "lora", **{**MLM_RUN, "data.path": str(mlm_data), "train.init_from": str(run),
                                              "lora.r": 4, "lora.targets": "q,v", "train.max_steps": 20,
                                              "train.eval_interval": 10, "train.save_interval": 20})
    Trainer(lora, progress=False, tensorboard=False).fit()
    assert main(["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    adapted, _, _ = load_for_inference(tmp_path / "lora", "cpu")
    merged = load(str(tmp_path / "merged"))
    assert isinstance(merged, MaskFiller) and merged.model.config.causal is False
    x = torch.randint(0, adapted.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), adapted(x), rtol=1e-5, atol=1e-5)
