"""Generation for people and programs: text in, text out, every entry point a reader of the one decoding loop.

    complete(model, tokenizer, prompts, config)  -> [prompt][sequence] Completion(text, token_ids, finish_reason, ...)
    generate(model, tokenizer, prompt, **options) -> the new text (or a list of texts)
    stream(model, tokenizer, prompt, **options)   -> text pieces as they are generated
    generate_batch_ids / generate_ids             -> new token ids, for code that works on ids
    TextGenerator / load(path)                    -> a model and its tokenizer, ready for the above
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

from lmforge.errors import ConfigError
from lmforge.generate.beam import beam_search
from lmforge.generate.config import GenerateConfig
from lmforge.generate.compiled import apply_compile
from lmforge.generate.decode import decode_rows
from lmforge.generate.quantize import apply_inference_dtype
from lmforge.generate.healing import heal
from lmforge.generate.rows import Event, Logprobs, Row, crop_prompt, make_rows, prompt_ids
from lmforge.generate.speculative import DraftModel, PromptLookup, check_assistant, early_exit, speculative_rows
from lmforge.lora import use_adapter
from lmforge.model import GPT


def options(config: Optional[GenerateConfig], kwargs: dict[str, Any]) -> GenerateConfig:
    """The GenerateConfig an entry point was given: `config`, its fields in kwargs, or config with kwargs changed."""
    if config is None:
        return GenerateConfig(**kwargs)
    return replace(config, **kwargs) if kwargs else config


def decode_events(model: GPT, rows: list[Row], config: GenerateConfig,
           assistant_model: Optional[GPT] = None) -> Iterator[list[Event]]:
    """The Events of decoding `rows`: one token per row per step (decode.decode_rows), or by speculation
    (generate.speculative) with an assistant (draft) model, the model's own first layers
    (config.assistant_early_exit) or config.prompt_lookup_num_tokens."""
    if assistant_model is None and config.prompt_lookup_num_tokens is None and config.assistant_early_exit is None:
        return decode_rows(model, rows)
    if config.guidance_scale != 1.0:
        raise ConfigError(f"generate.guidance_scale={config.guidance_scale!r} with speculative decoding (an "
                          "assistant model) is not supported: use one of them")
    if assistant_model is not None and config.prompt_lookup_num_tokens is not None:
        raise ConfigError("an assistant (draft) model and prompt_lookup_num_tokens both guess tokens: give one")
    if assistant_model is not None and config.assistant_early_exit is not None:
        raise ConfigError("an assistant (draft) model and assistant_early_exit (the model's own first layers) both "
                          "guess tokens: give one")
    if config.assistant_early_exit is not None:
        cut = early_exit(model, config.assistant_early_exit)
        return speculative_rows(model, rows, lambda row: DraftModel(cut), config.num_assistant_tokens)
    if assistant_model is not None:
        check_assistant(model, assistant_model)
        return speculative_rows(model, rows, lambda row: DraftModel(assistant_model), config.num_assistant_tokens)
    lookup = PromptLookup(config.max_matching_ngram_size)
    return speculative_rows(model, rows, lambda row: lookup, config.prompt_lookup_num_tokens)


def no_beams_with(assistant_model: Optional[GPT], config: GenerateConfig) -> None:
    if assistant_model is not None and config.num_beams > 1:
        raise ConfigError(f"an assistant (draft) model speculates on one sequence and beam search (num_beams="
                          f"{config.num_beams}) keeps several: use one of them")


class Completion(NamedTuple):
    """One generated continuation, with what a server reports about it."""

    text: str  # the new text, ending before a stop string
    token_ids: list[int]  # the new tokens, without an end token (up to the one that completed a stop string)
    finish_reason: str  # "stop" (end token, stop token id or stop string) or "length" (the budget ran out)
    prompt_tokens: int  # tokens of the prompt as the model saw it (<START> included, after cropping)
    logprobs: Optional[list[Logprobs]] = None  # with complete(logprobs=k): each new token's, and the k likeliest


def generate_batch_ids(model: GPT, prompts: Sequence[Sequence[int]], config: Optional[GenerateConfig] = None,
                       end_id: Optional[int] = None, tokenizer: Any = None, assistant_model: Optional[GPT] = None,
                       adapters: Optional[Sequence[Optional[str]]] = None, **kwargs: Any) -> list[list[list[int]]]:
    """New token ids for each prompt and each of its num_return_sequences sequences: [prompt][sequence] -> ids
    (without the prompt and without an end id: end_id or a stop_token_ids entry). Options come as a
    GenerateConfig or as its fields in kwargs; stop_strings need the tokenizer. assistant_model: a smaller model
    with the same vocabulary that drafts tokens for speculative decoding. adapters: per prompt, the LoRA adapter set
    of `model` it decodes with (lora.add_adapter_set; None: the base), all in one batch (peft's adapter_names)."""
    config = options(config, kwargs)
    no_beams_with(assistant_model, config)
    if config.token_healing:
        raise ConfigError("token_healing changes the prompt's last token, which new ids alone cannot show: use "
                          "complete() or generate(), whose text begins with what the healed token adds")
    if adapters is not None:
        check_adapters(model, adapters, len(prompts), config, assistant_model)
    if not prompts:
        return []
    if config.num_beams > 1:
        return beam_search(model, prompts, config, config.end_ids(end_id), tokenizer)
    rows = make_rows(model, prompts, config, end_id, tokenizer)
    copies = config.num_return_sequences
    for i, row in enumerate(rows if adapters is not None else ()):
        row.adapter = adapters[i // copies]
    for _ in decode_events(model, by_adapter(rows) if adapters is not None else rows, config, assistant_model):
        pass
    return [[row.tokens for row in rows[p * copies:(p + 1) * copies]] for p in range(len(prompts))]


def by_adapter(items: list) -> list:
    """`items` (Rows or serve jobs, each with an adapter) with those of one adapter set next to each other (the base's
    first), otherwise in their order: a set's rows are then a slice of the batch (lora.row_sets)."""
    return sorted(items, key=lambda item: (item.adapter is not None, item.adapter or ""))


def check_adapters(model: GPT, adapters: Sequence[Optional[str]], prompts: int, config: GenerateConfig,
                   assistant_model: Optional[GPT]) -> None:
    """ConfigError unless `adapters` names one adapter set of `model` (or None) per prompt, for a plain decode."""
    from lmforge.lora import adapter_sets

    if isinstance(adapters, str) or len(adapters) != prompts:
        raise ConfigError(f"adapters names a LoRA adapter set per prompt: give a list of {prompts} names (None for "
                          f"the base), not {adapters!r}")
    unknown = sorted({name for name in adapters if name is not None} - adapter_sets(model))
    if unknown:
        raise ConfigError(f"adapters names {', '.join(map(repr, unknown))}, which the model has no adapter set for "
                          f"(it has: {', '.join(sorted(adapter_sets(model))) or 'none'}); add it with "
                          f"lora.add_adapter_set or generate.load_adapters")
    if (config.num_beams > 1 or assistant_model is not None or config.prompt_lookup_num_tokens is not None
            or config.assistant_early_exit is not None):
        raise ConfigError("adapters per prompt decode in one plain batch: not with beam search or speculative "
                          "decoding; decode each adapter's prompts apart (lora.use_adapter)")


def generate_ids(model: GPT, prompt_ids: Sequence[int], config: Optional[GenerateConfig] = None,
                 end_id: Optional[int] = None, **kwargs: Any) -> list[list[int]]:  # kwargs: also assistant_model
    """New token ids (without the prompt, cut before end_id) for each of num_return_sequences samples."""
    return generate_batch_ids(model, [prompt_ids], config, end_id, **kwargs)[0]


def complete(model: GPT, tokenizer: Any, prompts: Sequence[str], config: Optional[GenerateConfig] = None,
             assistant_model: Optional[GPT] = None, logprobs: Optional[int] = None,
             **kwargs: Any) -> list[list[Completion]]:
    """The num_return_sequences Completions of each prompt, all decoded as one batch: [prompt][sequence]. With
    `logprobs` k, each Completion holds its new tokens' log probabilities and the k likeliest tokens' at each step,
    from the model's raw logits (before penalties, temperature and filters: Hugging Face's compute_transition_scores
    of output_logits with normalize_logits, OpenAI's logprobs)."""
    config = options(config, kwargs)
    no_beams_with(assistant_model, config)
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise ConfigError(f"logprobs={logprobs!r} is invalid: the number of likeliest tokens to report at each step "
                          "(0 or more)")
    if logprobs is not None and config.num_beams > 1:
        raise ConfigError(f"logprobs with beam search (num_beams={config.num_beams}) is not supported: a beam's "
                          "tokens are chosen by their sum, not one at a time; use num_beams=1")
    if not prompts:
        return []
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    copies = config.num_return_sequences
    if config.num_beams > 1:
        healed = [heal(model, tokenizer, crop_prompt(p, model.config.block_size)) if config.token_healing else
                  (p, b"") for p in encoded]  # (prompt, the bytes a healed last token adds to its text)
        beams = beam_search(model, [p for p, _ in healed], config, config.end_ids(tokenizer.end_id), tokenizer)
        out = []
        for (prompt, lead), hypotheses in zip(healed, beams):
            n_prompt = min(len(prompt), model.config.block_size)
            budget = config.new_tokens(n_prompt)
            out.append([Completion((lead + tokenizer.decode_bytes(ids)).decode("utf-8", errors="replace"), ids,
                                   "stop" if len(ids) < budget else "length", n_prompt) for ids in hypotheses])
        return out
    rows = make_rows(model, encoded, config, tokenizer.end_id, tokenizer)
    scores: list[list[Logprobs]] = [[] for _ in rows]
    for row in rows:
        row.top_logprobs = logprobs
    for events in decode_events(model, rows, config, assistant_model):
        for event in events:
            if event.logprobs is not None:
                scores[event.row].append(event.logprobs)
    return [[Completion(row.text.text, row.tokens, row.finish, len(row.prompt),
                        scores[i] if logprobs is not None else None)
             for i, row in enumerate(rows[p * copies:(p + 1) * copies], p * copies)] for p in range(len(prompts))]


def generate(model: GPT, tokenizer: Any, prompt: Union[str, Sequence[str]], config: Optional[GenerateConfig] = None,
             assistant_model: Optional[GPT] = None, **kwargs: Any) -> Union[str, list[str], list[list[str]]]:
    """The continuation of `prompt` (the new text only, ending before a stop string).

    prompt a str: a str, or a list of num_return_sequences texts when that is above 1.
    prompt a list of str (decoded as one batch): one entry per prompt, each a str or such a list.
    """
    config = options(config, kwargs)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    out: list = []
    for rows in complete(model, tokenizer, prompts, config, assistant_model):
        texts = [c.text for c in rows]
        out.append(texts[0] if config.num_return_sequences == 1 else texts)
    return out[0] if isinstance(prompt, str) else out


def stream(model: GPT, tokenizer: Any, prompt: str, config: Optional[GenerateConfig] = None,
           assistant_model: Optional[GPT] = None, **kwargs: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces while it is generated (one sequence, no beams).
    The pieces join to generate()'s text; text that may begin a stop string is held back until it does not."""
    config = options(config, kwargs)
    if config.num_return_sequences != 1 or config.num_beams != 1:
        raise ConfigError("stream() generates one sequence without beam search; set num_return_sequences=1 and "
                          "num_beams=1, or use generate()")
    rows = make_rows(model, [prompt_ids(tokenizer, prompt)], config, tokenizer.end_id, tokenizer)
    return (event.text for events in decode_events(model, rows, config, assistant_model) for event in events if event.text)


class TextGenerator:
    """A model and its tokenizer, ready to continue prompts: .generate(prompt, **kw), .stream(prompt, **kw),
    .complete(prompts, **kw); kw are GenerateConfig fields. compile=True decodes through apply_compile(model).
    assistant_model: a smaller model with the same tokenizer that drafts tokens (speculative decoding; with
    compile=True it guesses through its own compiled step, while the model checks the guesses eagerly).

    A model fine-tuned on text-to-text task data carries the prompt template it learned with (`template`, as
    data.tasks stores it): every prompt is rendered through it first (`render`), as its training examples were.
    """

    def __init__(self, model: GPT, tokenizer: Any, compile: bool = False, template: Optional[dict] = None,
                 assistant_model: Optional[GPT] = None, adapter: Optional[str] = None) -> None:
        if model.config.head != "lm":
            raise ConfigError(f"this is a {model.config.head} model (model.head={model.config.head!r}): it scores "
                              "classes and does not generate text")
        if not model.config.causal:
            raise ConfigError("this is an encoder (model.causal false): every position sees the whole text, so it "
                              "fills masks (lmforge fill-mask) and does not generate text")
        self.model = apply_compile(model.eval()) if compile else model.eval()  # a CompiledGPT decodes like the GPT
        self.tokenizer = tokenizer
        self.template = template
        self.adapter = adapter  # load_adapters: the model's adapter set this generator decodes with (lora.use_adapter)
        self.assistant_model = None
        if assistant_model is not None:
            check_assistant(model, assistant_model)
            self.assistant_model = apply_compile(assistant_model.eval()) if compile else assistant_model.eval()

    def render(self, prompt: str, **fields: str) -> str:
        """The text the model continues: `prompt` through the template (its {prompt} field; any other field it
        names comes from `fields`), or `prompt` itself without a template."""
        if self.template is None:
            return prompt
        from lmforge.data.tasks import render_prompt

        missing = [f for f in self.template["fields"] if f != "prompt" and f not in fields]
        if missing:
            raise ConfigError(f"this model's prompt template {self.template['prompt']!r} needs the field(s) "
                              f"{', '.join(missing)} besides the prompt: render it yourself (TextGenerator.render("
                              "prompt, NAME=VALUE)) and give that text with the template off (--no-template, "
                              "load(..., template=False))")
        return render_prompt(self.template, {**fields, "prompt": prompt})

    def _chat_template(self) -> dict:
        """The template conversations go through: the one the model was fine-tuned with, else the model's own (an
        imported instruct model's Jinja template), else lmforge's default <|role|> turns."""
        from lmforge.data.tasks import CHAT_TEMPLATE, own_chat

        if self.template is not None:
            return self.template
        # a model never fine-tuned on conversations knows no tools turn: tools are not listed for it
        return {"chat": own_chat(self.tokenizer) or {**CHAT_TEMPLATE, "tools_turn": False}}

    def render_chat(self, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                    variables: Optional[dict[str, Any]] = None, **more: Any) -> str:
        """The text the model continues for a conversation ([{"role", "content"}, ...]): every turn through the
        model's chat template (see _chat_template), then the header of the assistant's reply. An assistant turn may
        hold tool_calls and tools lists the functions the model may call, as in apply_chat_template
        (lmforge.data.conversation); `variables` and other keyword arguments are values a model's own template
        reads, as apply_chat_template's extra keyword arguments (enable_thinking=False for Qwen3)."""
        from lmforge.data.tasks import render_chat

        values = {**(variables or {}), **more}
        return render_chat(self._chat_template(), list(messages), list(tools) if tools else None, values or None)

    def call_format(self) -> Any:
        """How the model's chat template writes an assistant turn's tool calls (data.tasks.call_format): the form
        the server holds a reply with tools to and reads its calls from."""
        from lmforge.data.tasks import call_format

        return call_format(self._chat_template())

    def chat_stop(self) -> str:
        """The header of a user turn: a model that goes on past its reply would write it next."""
        from lmforge.data.tasks import chat_stop

        return chat_stop(self._chat_template())

    def generate(self, prompt: Union[str, Sequence[str]], config: Optional[GenerateConfig] = None,
                 **kwargs: Any) -> Union[str, list[str], list[list[str]]]:
        """The continuation of prompt, or of each prompt of a list (one batch): a str per prompt, or a list
        of them when num_return_sequences > 1."""
        rendered = self.render(prompt) if isinstance(prompt, str) else [self.render(p) for p in prompt]
        with use_adapter(self.adapter):
            return generate(self.model, self.tokenizer, rendered, config, self.assistant_model, **kwargs)

    def stream(self, prompt: str, config: Optional[GenerateConfig] = None, **kwargs: Any) -> Iterator[str]:
        """Text pieces of one continuation as they are generated."""
        pieces = stream(self.model, self.tokenizer, self.render(prompt), config, self.assistant_model, **kwargs)
        return pieces if self.adapter is None else _with_adapter(self.adapter, pieces)

    def complete(self, prompts: Sequence[str], config: Optional[GenerateConfig] = None,
                 **kwargs: Any) -> list[list[Completion]]:
        """Completion(text, token_ids, finish_reason, prompt_tokens) per prompt and sequence, as one batch."""
        with use_adapter(self.adapter):
            return complete(self.model, self.tokenizer, [self.render(p) for p in prompts], config,
                            self.assistant_model, **kwargs)


def _with_adapter(adapter: str, pieces: Iterator[str]) -> Iterator[str]:
    """`pieces`, each made with the adapter set `adapter` chosen (lora.use_adapter), not while the caller holds it."""
    while True:
        with use_adapter(adapter):
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece


def load(path: str, device: str = "cpu", dtype: str = "fp32", quantize: Optional[str] = None,
         compile: bool = False, template: bool = True,
         assistant: Optional[str] = None) -> Union[TextGenerator, "TextClassifier", "MaskFiller", "RewardModel"]:
    """A TextGenerator over the checkpoint at `path` (a run directory: its newest intact checkpoint);
    dtype / quantize as apply_inference_dtype (default fp32, exact), compile as apply_compile. A fine-tuned
    model's prompt template is applied unless template=False. A classifier (model.head: classify) gives a
    generate.classify.TextClassifier with the label names its checkpoint stores (LABEL_0, ... without them), or a
    generate.reward.RewardModel for a reward model (train.objective reward, with its data's template); an
    encoder trained with mlm (model.causal false), a generate.fill_mask.MaskFiller. assistant: the run or checkpoint
    directory of a smaller model with the same tokenizer, which drafts tokens for speculative decoding."""
    from lmforge.checkpoint import load_for_inference, read_task, verified_checkpoint  # on use: reads files
    from lmforge.generate.classify import TextClassifier

    ckpt, manifest = verified_checkpoint(path)
    model, tokenizer, _ = load_for_inference(ckpt, device, manifest)
    if assistant is not None and (model.config.head != "lm" or not model.config.causal):
        raise ConfigError(f"{path} does not generate text, so an assistant (draft) model has nothing to speed up")
    if model.config.head == "classify":
        task = read_task(ckpt) or {}
        if task.get("task") == "reward":
            from lmforge.generate.reward import RewardModel

            return RewardModel(apply_inference_dtype(model, dtype, quantize), tokenizer,
                               task.get("template") if template else None)
        labels = task.get("labels") or [f"LABEL_{k}" for k in range(model.config.num_labels)]
        return TextClassifier(apply_inference_dtype(model, dtype, quantize), tokenizer, labels)
    if not model.config.causal:
        from lmforge.generate.fill_mask import MaskFiller

        return MaskFiller(apply_inference_dtype(model, dtype, quantize), tokenizer)
    from lmforge.data.tasks import TEXT_TASKS

    task = read_task(ckpt) if template else None
    learned = task.get("template") if task is not None and task["task"] in TEXT_TASKS else None
    drafter = load_assistant(assistant, model, tokenizer, path, device, dtype, quantize) if assistant else None
    return TextGenerator(apply_inference_dtype(model, dtype, quantize), tokenizer, compile, learned, drafter)


def load_adapters(generator: TextGenerator, modules: dict[str, str], base_path: str,
                  fingerprint: Optional[str] = None) -> dict[str, TextGenerator]:
    """{name: TextGenerator} of LoRA runs trained on the model of `generator` (loaded from base_path; `fingerprint`
    lora.base_fingerprint of its weights as loaded, in fp32, computed here when not given), each over that same
    model with its adapters added as the set `name`
    (lora.add_adapter_set: lora.use_adapter picks it) and the prompt template the run learned. ConfigError, naming the
    run, for one that is not a LoRA run of a language model on exactly these weights and this tokenizer, or that
    learned rows for added tokens (its vocabulary is not the base's); a QLoRA run only over a model whose blocks are
    in nf4 (apply_inference_dtype quantize="nf4": the 4 bits it trained on), without 8-bit maxima or a LoftQ base of
    its own."""
    from lmforge.checkpoint import lora_base, read_run_config, read_task, verified_checkpoint  # on use: reads files
    from lmforge.checkpoint.weights import read_weights
    from lmforge.data.tasks import TEXT_TASKS
    from lmforge.lora import add_adapter_set, base_fingerprint
    from lmforge.nf4 import NF4Linear
    from lmforge.tokenizer import Tokenizer

    model, out = generator.model, {}
    in_nf4 = any(isinstance(m, NF4Linear) for m in model.modules())  # served with --quantize nf4
    for name, path in modules.items():
        ckpt, manifest = verified_checkpoint(path)
        config = read_run_config(ckpt)
        where = f"the LoRA run {name}={path}"
        if config.lora is None:
            raise ConfigError(f"{where} holds a whole model, not LoRA adapters: serve it on its own")
        if config.lora.quantize is not None:  # QLoRA: served over the base in the same 4 bits, or not at all
            if not in_nf4:
                raise ConfigError(f"{where} trained on its base in 4 bits (lora.quantize {config.lora.quantize}), "
                                  f"which {base_path} served so is not: serve the base with --quantize nf4, or the run "
                                  f"on its own")
            if config.lora.double_quant:
                raise ConfigError(f"{where} trained on its base with 8-bit maxima (lora.double_quant), which "
                                  f"--quantize nf4 does not store: serve it on its own (its base is quantized with it)")
            if config.lora.init == "loftq" and config.lora.loftq_iter > 1:
                raise ConfigError(f"{where} quantized its own base (lora.loftq_iter {config.lora.loftq_iter}: W less "
                                  f"its adapters' start), not {base_path}'s: serve it on its own")
        if config.model.vocab_size != model.config.vocab_size or config.model.head != "lm":
            raise ConfigError(f"{where} is not a language model of {base_path}'s vocabulary (it learned rows for "
                              f"added tokens, or scores instead): serve it on its own (its base is loaded with it)")
        fingerprint = fingerprint or base_fingerprint(model)
        if lora_base(ckpt)["fingerprint"] != fingerprint:
            raise ConfigError(f"{where} was trained on other weights than {base_path}'s: serve it with its own base "
                              f"({lora_base(ckpt)['path']})")
        theirs = Tokenizer.load(ckpt / "tokenizer.json") if "tokenizer.json" in manifest["files"] else None
        if (theirs is None) != (generator.tokenizer is None) or (
                theirs is not None and theirs.to_dict() != generator.tokenizer.to_dict()):
            raise ConfigError(f"{where} has another tokenizer than {base_path}: serve it on its own")
        weights = read_weights(ckpt)
        heads = sorted(k for k in weights if ".lora." not in k)
        if heads:
            raise ConfigError(f"{where} trained {', '.join(heads[:3])} whole beside its adapters: serve it on its own")
        add_adapter_set(model, name, config.lora, weights)
        task = read_task(ckpt)
        learned = task.get("template") if task is not None and task["task"] in TEXT_TASKS else None
        out[name] = TextGenerator(model, generator.tokenizer, template=learned, adapter=name)
    return out


def load_assistant(path: str, model: GPT, tokenizer: Any, model_path: str, device: Any = "cpu", dtype: str = "fp32",
                   quantize: Optional[str] = None) -> GPT:
    """The assistant (draft) model at `path` (a run or checkpoint directory) for `model` (read from model_path),
    checked: a causal language model with the same tokenizer."""
    from lmforge.checkpoint import load_for_inference, verified_checkpoint  # on use: reads files

    ckpt, manifest = verified_checkpoint(path)
    drafter, draft_tokenizer, _ = load_for_inference(ckpt, device, manifest)
    if (draft_tokenizer is None) != (tokenizer is None) or \
            (tokenizer is not None and draft_tokenizer.to_dict() != tokenizer.to_dict()):
        raise ConfigError(f"the assistant model {path} has another tokenizer than {model_path}: a draft model must "
                          "use the model's tokenizer (train it on the same prepared data)")
    check_assistant(model, drafter)
    return apply_inference_dtype(drafter, dtype, quantize)
