"""The watermark (generate/watermark.py): Hugging Face's WatermarkLogitsProcessor and WatermarkDetector bit for bit,
its generate on the same weights token for token; sampled text with the mark is detected and text without is not;
speculation keeps it; `lmforge detect` reads it back."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.generate import GenerateConfig, TextGenerator, generate_batch_ids  # noqa: E402
from lmforge.generate.watermark import Watermark, detect, greenlist, watermark_scores  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.tokenizer import byte_tokenizer  # noqa: E402
from test_generate_hf import PROMPTS, build_pair, hf_generate  # noqa: E402

SETTINGS = [("lefthash", 1), ("lefthash", 3), ("selfhash", 1), ("selfhash", 3)]


@pytest.mark.parametrize("scheme, width", SETTINGS)
def test_greenlists_and_scores_equal_hfs_processor(scheme, width):
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    V = 300
    theirs = WatermarkLogitsProcessor(V, "cpu", greenlist_ratio=0.3, bias=1.5, hashing_key=7919, seeding_scheme=scheme,
                                      context_width=width)
    mark = Watermark(0.3, 1.5, 7919, scheme, width)
    torch.manual_seed(0)
    ids = torch.randint(0, V, (5, 9))
    ids[0, -1] = 0  # a seed of 0
    for row in ids:
        assert torch.equal(greenlist(mark, row.tolist(), V), theirs._get_greenlist_ids(row))
        assert greenlist(mark, row.tolist(), V).numel() == int(V * 0.3)
    scores = torch.randn(5, V) * 3
    ours = watermark_scores(scores, [r.tolist() for r in ids], mark)
    assert torch.equal(ours, theirs(ids, scores.clone()))
    assert ((ours - scores) > 0).sum(-1).tolist() != [0] * 5  # it added something


@pytest.mark.parametrize("scheme, width", SETTINGS)
@pytest.mark.parametrize("ignore_repeated", [False, True])
def test_detection_equals_hfs_detector(scheme, width, ignore_repeated):
    from transformers.generation.watermarking import WatermarkDetector

    V = 300
    config = transformers.GPT2Config(vocab_size=V, bos_token_id=V - 1, eos_token_id=V - 1)
    marking = transformers.WatermarkingConfig(seeding_scheme=scheme, context_width=width)
    theirs = WatermarkDetector(config, "cpu", marking, ignore_repeated_ngrams=ignore_repeated)
    torch.manual_seed(1)
    ids = torch.randint(0, V - 1, (1, 60))
    ids[0, 10:25] = ids[0, 35:50]  # repeated n-grams
    want = theirs(ids, return_dict=True)
    got = detect(ids[0].tolist(), V, Watermark(scheme=scheme, context_width=width), ignore_repeated)
    assert got["num_tokens_scored"] == want.num_tokens_scored[0] and got["num_green_tokens"] == want.num_green_tokens[0]
    assert got["z_score"] == pytest.approx(float(want.z_score[0]), abs=1e-12)
    assert got["p_value"] == pytest.approx(float(want.p_value[0]), abs=1e-12)
    assert got["prediction"] == bool(want.prediction[0])


def test_sampling_adds_the_mark_after_temperature_and_the_filters_as_hf():
    from transformers.generation import logits_process as lp

    from lmforge.generate.processors import sampling_logits

    V = 300
    torch.manual_seed(2)
    ids, scores = torch.randint(0, V, (4, 6)), torch.randn(4, V) * 2
    config = GenerateConfig(temperature=0.7, top_k=50, top_p=0.9, watermark=True, watermark_bias=1.5)
    theirs = scores.clone()
    for processor in [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9),
                      lp.WatermarkLogitsProcessor(V, "cpu", bias=1.5)]:
        theirs = processor(ids, theirs)
    ours = sampling_logits(scores, config, [r.tolist() for r in ids])
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.allclose(ours[ours.isfinite()], theirs[theirs.isfinite()])


def test_watermarked_generate_equals_hf_greedy_and_with_beams():
    ours, theirs = build_pair(3.0)
    marked = transformers.WatermarkingConfig(bias=4.0, greenlist_ratio=0.4, hashing_key=99991)
    options = dict(watermark=True, watermark_bias=4.0, watermark_greenlist_ratio=0.4, watermark_key=99991)
    got = generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=20, **options)
    assert got == hf_generate(theirs, PROMPTS, None, 20, watermarking_config=marked)
    assert got != generate_batch_ids(ours, PROMPTS, greedy=True, max_new_tokens=20)  # the mark changed the text
    beams = generate_batch_ids(ours, PROMPTS, end_id=3, num_beams=3, max_new_tokens=12, **options)
    assert beams == hf_generate(theirs, PROMPTS, 3, 12, num_beams=3, watermarking_config=marked)


@pytest.fixture(scope="module")
def flat():
    """A random model over bytes: its next-token distributions are wide, as a watermark needs."""
    torch.manual_seed(0)
    return TextGenerator(GPT(ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval(),
                         byte_tokenizer())


@pytest.mark.parametrize("scheme, width", [("lefthash", 1), ("selfhash", 2)])
def test_sampled_text_with_the_mark_is_detected_and_without_is_not(flat, scheme, width):
    options = dict(max_new_tokens=150, temperature=1.0, top_k=40, num_return_sequences=3,
                   suppress_tokens=[flat.tokenizer.end_id])  # (150 tokens each)
    mark = dict(watermark=True, watermark_scheme=scheme, watermark_context_width=width)
    settings = GenerateConfig(**mark).watermark_settings
    with_mark = flat.complete(["The "], seed=3, **options, **mark)[0]
    without = flat.complete(["The "], seed=3, **options)[0]
    for c in with_mark:
        found = detect(c.token_ids, 259, settings)
        assert found["prediction"] and found["z_score"] > 5 and found["green_fraction"] > 0.5, found
    for c in without:
        assert abs(detect(c.token_ids, 259, settings)["z_score"]) < 3
    other_key = Watermark(key=12345, scheme=scheme, context_width=width)  # without the key, nothing to see
    assert all(abs(detect(c.token_ids, 259, other_key)["z_score"]) < 3 for c in with_mark)


def test_speculation_keeps_the_watermarked_greedy_tokens(flat):
    model, draft = flat.model, GPT(ModelConfig(vocab_size=259, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = [[flat.tokenizer.start_id] + flat.tokenizer.encode("abab abab ab")]
    for scheme in ("lefthash", "selfhash"):
        config = dict(greedy=True, max_new_tokens=40, watermark=True, watermark_bias=3.0, watermark_scheme=scheme)
        want = generate_batch_ids(model, prompt, **config)
        assert generate_batch_ids(model, prompt, prompt_lookup_num_tokens=3, **config) == want
        assert generate_batch_ids(model, prompt, assistant_model=draft, num_assistant_tokens=3, **config) == want
        assert want != generate_batch_ids(model, prompt, greedy=True, max_new_tokens=40)


def test_lmforge_detect_reads_what_lmforge_generate_marked(tmp_path, capsys):
    from test_serve import make_run

    from lmforge.cli import main

    run = make_run(tmp_path)
    flags = ["--max-new-tokens", "120", "--seed", "1", "--device", "cpu", "--no-stream",
             "--guided-regex", "[a-z ]+"]  # (text that encodes back to the tokens generated: no cut characters)
    assert main(["generate", str(run), "--prompt", "", *flags, "--watermark", "--watermark-key", "7"]) == 0
    marked = capsys.readouterr().out.rstrip("\n")
    assert main(["generate", str(run), "--prompt", "", *flags]) == 0
    plain = capsys.readouterr().out.rstrip("\n")
    (tmp_path / "marked.txt").write_text(marked, encoding="utf-8")
    assert main(["detect", str(run), "--file", str(tmp_path / "marked.txt"), "--whole-file", "--text", plain,
                 "--watermark-key", "7", "--device", "cpu"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["index"] for f in found] == [0, 1]
    assert found[1]["prediction"] and found[1]["z_score"] > 5  # the file: --text comes first
    assert not found[0]["prediction"] and abs(found[0]["z_score"]) < 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["detect", str(run), "--text", marked, "--watermark-key", "8", "--device", "cpu"]) == 0
    assert not json.loads(capsys.readouterr().out)["prediction"]  # another key
