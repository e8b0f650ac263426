"""GenerateConfig: how to continue a prompt, checked once, on construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

from lmforge.config import doc, validate
from lmforge.errors import ConfigError

if TYPE_CHECKING:  # (imported where used: it needs torch, which `lmforge --help` need not load)
    from lmforge.generate.watermark import Watermark


Dtype = Literal["fp32", "bf16", "fp16"]  # weights for decoding (generate.quantize.apply_inference_dtype)
Quantize = Literal["int8", "nf4"]  # weight-only quantization of the Linear layers

# Bounds that keep sampling finite: below them a division of the logits overflows (float32, and fp16 logits for
# the repetition penalty) or top_p underflows to 0 in a float32 comparison, and every row samples garbage.
# vLLM clamps temperature to the same 0.01.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 1e-6
MAX_PENALTY = 100.0
MAX_BIAS = 100.0  # OpenAI's bound on logit_bias


@dataclass
class GenerateConfig:
    """How to continue a prompt. Every field is checked on construction (lmforge.config.validate), the same
    for the Python API, the CLI (whose generate flags are made from these fields) and the server."""

    max_new_tokens: Optional[int] = doc("Tokens to generate at most (when max_length is null); null = 100.", None, ge=1)
    max_length: Optional[int] = doc("Prompt (with <START>) plus new tokens at most; overrides max_new_tokens.",
                                    None, ge=1)
    greedy: bool = doc("Always take the most likely token (as does temperature 0).", False)
    temperature: float = doc(f"Divide logits by this before sampling; 0 = greedy, else at least {MIN_TEMPERATURE}.",
                             1.0, ge=0, lt=math.inf, invalid=f"0 (greedy) or a number >= {MIN_TEMPERATURE}")
    top_h: Optional[float] = doc("Top-H sampling (arXiv 2509.02510, Hugging Face's top_h): keep the most likely "
                                 "tokens while the entropy they add up to stays within top_h times the entropy of "
                                 "the 100 most likely; null = off.", None, gt=0, le=1, noun="number")
    top_k: Optional[int] = doc("Sample only among the k most likely tokens; null = all.", None, ge=1)
    top_p: Optional[float] = doc("Nucleus sampling: the smallest set of tokens with probability >= top_p; null = 1 "
                                 "= all.", None, ge=MIN_TOP_P, le=1, noun="probability")
    min_p: Optional[float] = doc("Sample only tokens with probability >= min_p * that of the most likely; null = "
                                 "all.", None, ge=0, le=1, noun="probability")
    typical_p: Optional[float] = doc("Locally typical sampling (Meister et al. 2023): keep the tokens whose surprise "
                                     "-log p is closest to the entropy, until they hold this much probability; null "
                                     "= off.", None, gt=0, le=1, noun="probability")
    epsilon_cutoff: Optional[float] = doc("Epsilon sampling (Hewitt et al. 2022): drop the tokens of probability "
                                          "below this; null = off.", None, gt=0, lt=1, noun="probability")
    eta_cutoff: Optional[float] = doc("Eta sampling (Hewitt et al. 2022): drop the tokens of probability below "
                                      "min(eta, sqrt(eta) * exp(-entropy)); null = off.", None, gt=0, lt=1,
                                      noun="probability")
    repetition_penalty: float = doc("Divide positive logits (multiply negative ones) of tokens already in the "
                                    "sequence, prompt included, by this (Keskar et al. 2019); 1 = off.", 1.0,
                                    ge=1 / MAX_PENALTY, le=MAX_PENALTY,
                                    invalid=f"a number in [{1 / MAX_PENALTY}, {MAX_PENALTY}] (1 = off, above 1 "
                                            "discourages repeats)")
    encoder_repetition_penalty: float = doc(
        "Multiply positive logits (divide negative ones) of the prompt's tokens by this (Hugging Face's "
        "encoder_repetition_penalty, a decoder's 'encoder input' being its prompt): above 1 the answer keeps to the "
        "prompt's words (summaries, answers from a text), below 1 it avoids them; 1 = off.", 1.0,
        ge=1 / MAX_PENALTY, le=MAX_PENALTY,
        invalid=f"a number in [{1 / MAX_PENALTY}, {MAX_PENALTY}] (1 = off, above 1 favours the prompt's tokens)")
    no_repeat_ngram_size: int = doc("Never repeat an n-gram of this size (prompt included); 0 = off.", 0, ge=0)
    presence_penalty: float = doc("Subtract this from the score of every token already generated (not the prompt's), "
                                  "once (OpenAI's presence_penalty); 0 = off, above 0 favours new tokens.", 0.0,
                                  ge=-2, le=2)
    frequency_penalty: float = doc("Subtract this times the number of times a token was generated so far from its "
                                   "score (OpenAI's frequency_penalty); 0 = off, above 0 discourages repeats.", 0.0,
                                   ge=-2, le=2)
    min_new_tokens: int = doc("No sequence ends before this many new tokens: the end token and stop_token_ids are "
                              "banned until then, and stop strings only count once they end past it (Hugging Face's "
                              "min_new_tokens, vLLM's min_tokens); 0 = off.", 0, ge=0)
    min_length: int = doc("No sequence ends before the prompt (with <START>) and its new tokens are this long: the end "
                          "token and stop_token_ids are banned until then (Hugging Face's min_length; stop strings "
                          "still count); 0 = off.", 0, ge=0)
    forced_bos_token_id: Optional[int] = doc(
        "The first new token is always this one (Hugging Face's forced_bos_token_id, e.g. a target-language tag "
        "after a translation prompt).", None, ge=0)
    forced_eos_token_id: Optional[list[int]] = doc(
        "The last token the budget allows (max_new_tokens or max_length) is always this one, so a sequence cut by "
        "the budget still ends properly; with several ids, the likeliest (Hugging Face's forced_eos_token_id).",
        None, ge=0)
    logit_bias: Optional[dict[int, float]] = doc(
        "Added to the scores of these token ids before anything else, {id: bias} (OpenAI's logit_bias; Hugging Face's "
        "sequence_bias for single tokens): -100 bans a token in practice, 100 all but forces it. Command line: "
        "ID:BIAS, comma-separated or repeated.", None, ge=-MAX_BIAS, le=MAX_BIAS)
    sequence_bias: Optional[dict[tuple[int, ...], float]] = doc(
        "Added to the score of a sequence's last token wherever the text ends with the rest of it, {(ids...): bias} "
        "(Hugging Face's sequence_bias; a sequence of one token: always, as logit_bias). Python also takes Hugging "
        "Face's list [[ids, bias], ...]. Command line: IDS:BIAS, the ids separated by spaces ('10 45:-5'), repeated.",
        None, ge=-MAX_BIAS, le=MAX_BIAS)
    bad_words_ids: Optional[list[list[int]]] = doc(
        "Token sequences never generated: a sequence's last token is banned wherever the text ends with the rest of "
        "it; a sequence of one token is never generated (Hugging Face's bad_words_ids). Command line: one sequence "
        "per flag, its ids separated by commas.", None, ge=0)
    bad_words: Optional[list[str]] = doc("Texts never generated, each banned as the tokens it encodes to, as written "
                                         "and after a space (vLLM's bad_words); needs the tokenizer.", None)
    suppress_tokens: Optional[list[int]] = doc("Token ids never generated (Hugging Face's suppress_tokens).", None,
                                               ge=0)
    begin_suppress_tokens: Optional[list[int]] = doc(
        "Token ids not generated as the first new token (Hugging Face's begin_suppress_tokens): e.g. the end token, "
        "so that no answer is empty.", None, ge=0)
    exponential_decay_length_penalty: Optional[list[float]] = doc(
        "[start, factor]: once a sequence has start new tokens, each further one adds |s| * (factor ** k - 1) to the "
        "score s of the end token(s), k the new tokens past start (Hugging Face's exponential_decay_length_penalty): "
        "sequences end sooner, at a place the model finds fitting, without a hard cut. Command line: START,FACTOR.",
        None)
    guided_choice: Optional[list[str]] = doc(
        "Answer with exactly one of these texts (vLLM's guided_choice): each step allows only the tokens that continue "
        "one of them as the tokenizer encodes it, and the sequence ends once one is complete; needs the tokenizer. "
        "Not with beam search.", None)
    guided_regex: Optional[str] = doc(
        "Generate text that fully matches this regular expression (vLLM's guided_regex): each step allows only the "
        "tokens that keep a match reachable, and the sequence ends once the match is complete and cannot go on; "
        "needs the tokenizer. Not with beam search.", None)
    guided_json: Optional[str] = doc(
        "Generate JSON that follows this JSON schema (vLLM's guided_json; OpenAI's response_format json_schema), "
        "given as JSON text or, in Python, a dict: the schema becomes a regular expression (properties in its order, "
        "the required ones present, written as json.dumps writes them; $ref, formats and integer bounds are read) "
        "and decoding is held to it as with guided_regex.", None)
    guided_choice_ids: Optional[list[list[int]]] = doc(
        "guided_choice as token sequences (what guided_choice becomes once encoded; give either).", None, ge=0)
    guidance_scale: float = doc(
        "Classifier-free guidance (Sanchez et al. 2023, Hugging Face's guidance_scale): each step's scores become "
        "u + scale * (c - u), c and u the log probabilities given the prompt and given negative_prompt (the "
        "unconditional side, continued with the same tokens). Above 1 the text follows the prompt more closely, "
        "below 1 the negative prompt; 1 = off. Each sequence decodes a second row. Not with beam search or "
        "speculation.", 1.0, ge=0, le=MAX_PENALTY, invalid=f"a number in [0, {MAX_PENALTY}] (1 = off)")
    negative_prompt: Optional[str] = doc(
        "Classifier-free guidance: the text of the unconditional side (with <START> first, like a prompt); null = "
        "<START> alone (without a start token: the prompt's last token, as Hugging Face does).", None)
    negative_prompt_ids: Optional[list[int]] = doc("negative_prompt as token ids, used as given (give either).",
                                                   None, ge=0)
    watermark: bool = doc(
        "Watermark the text (Kirchenbauer et al. 2023, Hugging Face's watermarking_config): each step adds "
        "watermark_bias to a greenlist of the vocabulary seeded by the tokens before it, after temperature and the "
        "filters; `lmforge detect` (generate.watermark.detect) finds it, given the same watermark_* settings.", False)
    watermark_bias: float = doc("The watermark: the bias on green tokens (lower keeps more of the model's choices, "
                                "makes the mark fainter).", 2.0, gt=0, le=MAX_BIAS)
    watermark_greenlist_ratio: float = doc("The watermark: the share of the vocabulary that is green at each step.",
                                           0.25, gt=0, lt=1, noun="number")
    watermark_key: int = doc("The watermark: its hashing key (use your own, kept private: whoever has it can find "
                             "the mark).", 15485863, ge=0, lt=2**63)
    watermark_scheme: Literal["lefthash", "selfhash"] = doc(
        "The watermark: lefthash seeds each greenlist with the previous token; selfhash with the last "
        "watermark_context_width tokens and the candidate itself (sturdier against edits, slower).", "lefthash")
    watermark_context_width: int = doc("The watermark: tokens that seed a greenlist (selfhash).", 1, ge=1, le=64)
    num_beams: int = doc("Beam search with this many beams (deterministic: no sampling options apply); 1 = off.",
                         1, ge=1)
    length_penalty: float = doc("Beam search: a finished beam scores sum(log p) / new_tokens ** length_penalty.",
                                1.0, gt=-math.inf, lt=math.inf, invalid="a finite number")
    early_stopping: Union[bool, Literal["never"]] = doc(
        "Beam search: true = stop when num_beams beams have finished; false = also until no running beam can beat "
        "them (heuristic); never = exact.", False)
    max_time: Optional[float] = doc(
        "Stop after this many seconds from the start of the call (the step under way finishes), each sequence ending "
        "with what it has, finish reason 'length' (Hugging Face's max_time); null = no time limit.", None, gt=0,
        lt=math.inf, invalid="a positive number of seconds or null")
    stop_strings: Optional[list[str]] = doc("Stop a sequence when its text contains one of these; the text "
                                            "returned ends before it. Not with beam search.", None)
    stop_token_ids: Optional[list[int]] = doc("Token ids that end a sequence, besides the tokenizer's end token "
                                              "(excluded from the output).", None, ge=0)
    token_healing: bool = doc(
        "Token healing: back up over the prompt's last token and put in its place the likeliest token (greedy) whose "
        "text begins with it, so a prompt cut inside a word ('http') can go on as the model would write it "
        "('https://'); the new text begins with what the healed token adds ('s'). Hugging Face's token_healing. Not "
        "with guided decoding.", False)
    seed: Optional[int] = doc("Seed of the sampling generators (same seed, same tokens); null = random.", None,
                              ge=0, lt=2**63)
    num_return_sequences: int = doc("Continuations returned per prompt (generated as one batch; with beam "
                                    "search the best ones, at most num_beams).", 1, ge=1)
    prompt_lookup_num_tokens: Optional[int] = doc(
        "Speculative decoding without a draft model: guess up to this many tokens per step from the text so far "
        "(those that followed the latest earlier match of its last n-gram) and check them in one forward pass. "
        "Greedy output is unchanged, sampling keeps its distribution; pays when the output repeats its input. "
        "null = off.", None, ge=1, le=1024)
    max_matching_ngram_size: int = doc("Prompt lookup: the longest n-gram matched (shorter ones next).", 2, ge=1,
                                       le=1024)
    num_assistant_tokens: int = doc("Speculative decoding with an assistant (draft) model: tokens it guesses per "
                                    "step.", 5, ge=1, le=1024)
    assistant_confidence_threshold: Optional[float] = doc(
        "Speculative decoding with an assistant (draft) model: it stops guessing for the step after a guess it gives "
        "a probability below this, so a step spends no draft passes on guesses the model will likely refuse "
        "(Hugging Face's assistant_confidence_threshold, without its online tuning); null = off.", None, gt=0, le=1)
    assistant_early_exit: Optional[int] = doc(
        "Self-speculative decoding (LayerSkip, Elhoushi et al. 2024; Hugging Face's assistant_early_exit): the model's "
        "own first N layers, then its final norm and head, are the draft model (no second model to train or load); "
        "pays on a model whose early layers already predict well. null = off.", None, ge=1)
    num_assistant_tokens_schedule: Literal["constant", "heuristic"] = doc(
        "Speculative decoding: constant guesses num_assistant_tokens (or prompt_lookup_num_tokens) per step; "
        "heuristic starts there and guesses 2 more after a step that kept every guess, 1 fewer (1 at least) after "
        "one that did not (Hugging Face's schedule of the same name).", "constant")

    def __post_init__(self) -> None:
        if isinstance(self.guided_json, dict):
            self.guided_json = json.dumps(self.guided_json)
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.forced_eos_token_id, int) and not isinstance(self.forced_eos_token_id, bool):
            self.forced_eos_token_id = [self.forced_eos_token_id]
        if isinstance(self.sequence_bias, (list, tuple)):
            self.sequence_bias = _sequence_bias_pairs(self.sequence_bias)
        validate(self, "generate")
        for name, ids in (("logit_bias", list(self.logit_bias or {})),
                          ("sequence_bias", [t for seq in self.sequence_bias or {} for t in seq])):
            negative = next((t for t in ids if t < 0), None)
            if negative is not None:
                raise ConfigError(f"generate.{name} has the token id {negative}: token ids are 0 or positive")
        decay = self.exponential_decay_length_penalty
        if decay is not None:
            if len(decay) != 2 or not float(decay[0]).is_integer() or decay[0] < 0 or not 0 < decay[1] <= MAX_PENALTY:
                raise ConfigError(f"generate.exponential_decay_length_penalty={list(decay)!r} is invalid: [start, "
                                  "factor], start the new tokens before the end token's score grows (an integer >= "
                                  f"0), factor its growth per token (a number in (0, {MAX_PENALTY:g}], e.g. 1.05)")
            self.exponential_decay_length_penalty = [int(decay[0]), float(decay[1])]
        if self.bad_words is not None and not all(self.bad_words):
            raise ConfigError(f"generate.bad_words={self.bad_words!r} is invalid: a list of non-empty strings")
        if self.guided_choice is not None and not (self.guided_choice and all(self.guided_choice)):
            raise ConfigError(f"generate.guided_choice={self.guided_choice!r} is invalid: a list of non-empty "
                              "strings, at least one")
        if self.guided_choice_ids == []:
            raise ConfigError("generate.guided_choice_ids=[] allows no answer: give at least one token sequence")
        guides = [name for name in ("guided_choice", "guided_choice_ids", "guided_regex", "guided_json")
                  if getattr(self, name) is not None]
        if len(guides) > 1:
            raise ConfigError(f"generate.{guides[0]} and {guides[1]} both say what the answer may be: give one")
        guided = guides[0] if guides else None
        if self.guided_pattern is not None:
            from lmforge.generate.automaton import check_syntax

            check_syntax(self.guided_pattern)  # a one-line error now (its automaton is built by the first decode)
        if self.negative_prompt is not None and self.negative_prompt_ids is not None:
            raise ConfigError("generate.negative_prompt and negative_prompt_ids are the same thing: give one")
        if (self.negative_prompt is not None or self.negative_prompt_ids is not None) and self.guidance_scale == 1.0:
            raise ConfigError("generate.negative_prompt is only read by classifier-free guidance: set guidance_scale "
                              "(e.g. 1.5), or leave the negative prompt out")
        if self.negative_prompt_ids is not None and not self.negative_prompt_ids:
            raise ConfigError("generate.negative_prompt_ids=[] is invalid: at least one token id")
        changed = [f for f in ("watermark_bias", "watermark_greenlist_ratio", "watermark_key", "watermark_scheme",
                               "watermark_context_width") if getattr(self, f) != _DEFAULTS[f]]
        if changed and not self.watermark:
            raise ConfigError(f"generate.{changed[0]} is only read by the watermark: set watermark true, or leave it "
                              "out")
        if self.guidance_scale != 1.0 and self.num_beams > 1:
            raise ConfigError(f"generate.guidance_scale={self.guidance_scale!r} with beam search (num_beams="
                              f"{self.num_beams}) is not supported: use num_beams=1")
        if self.guidance_scale != 1.0 and self.prompt_lookup_num_tokens is not None:
            raise ConfigError(f"generate.guidance_scale={self.guidance_scale!r} with speculative decoding "
                              "(prompt_lookup_num_tokens) is not supported: use one of them")
        forced = [name for name in ("forced_bos_token_id", "forced_eos_token_id") if getattr(self, name) is not None]
        if guided and forced:
            raise ConfigError(f"generate.{guided} holds the answer to a pattern and {forced[0]} forces a token into "
                              "it: use one of them")
        if self.forced_eos_token_id == []:
            raise ConfigError("generate.forced_eos_token_id=[] forces no token: give at least one id, or leave it out")
        banned, first_banned = set(self.suppress_tokens or ()), set(self.begin_suppress_tokens or ())
        for name, ids, blocked in (("forced_bos_token_id", [self.forced_bos_token_id], banned | first_banned),
                                   ("forced_eos_token_id", self.forced_eos_token_id or [], banned)):
            if ids[:1] != [None] and ids and all(t in blocked for t in ids):  # nothing left to force
                which = "suppress_tokens" if ids[0] in banned else "begin_suppress_tokens"
                raise ConfigError(f"generate.{name}={ids[0]} is also in {which}: a token cannot be both forced and "
                                  "banned; drop it from one of them")
        if guided and self.token_healing:
            raise ConfigError(f"generate.{guided} holds the new text to a pattern from its start and token_healing "
                              "begins it with the end of a healed prompt token: use one of them")
        if guided and self.num_beams > 1:
            raise ConfigError(f"generate.{guided} picks the answer token by token and beam search (num_beams="
                              f"{self.num_beams}) keeps several: use num_beams=1")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(f"generate.temperature={self.temperature!r} is invalid: 0 (greedy) or a number >= "
                              f"{MIN_TEMPERATURE} (smaller ones overflow the logits)")
        sampling = {"temperature": self.temperature if self.temperature not in (0.0, 1.0) else None,
                    "top_h": self.top_h, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                    "typical_p": self.typical_p,
                    "epsilon_cutoff": self.epsilon_cutoff, "eta_cutoff": self.eta_cutoff}
        sampling = {k: v for k, v in sampling.items() if v is not None}
        if self.num_beams > 1 and sampling:
            raise ConfigError(f"generate.{next(iter(sampling))}={next(iter(sampling.values()))!r} is a sampling "
                              f"option and beam search (num_beams={self.num_beams}) does not sample: drop it or "
                              "use num_beams=1")
        penalties = {k: v for k, v in (("presence_penalty", self.presence_penalty),
                                       ("frequency_penalty", self.frequency_penalty)) if v != 0.0}
        if self.num_beams > 1 and penalties:
            raise ConfigError(f"generate.{next(iter(penalties))}={next(iter(penalties.values()))!r} counts one "
                              f"sequence's tokens and beam search (num_beams={self.num_beams}) keeps several: use "
                              "repetition_penalty or no_repeat_ngram_size, or num_beams=1")
        if self.assistant_confidence_threshold is not None and self.prompt_lookup_num_tokens is not None:
            raise ConfigError("generate.assistant_confidence_threshold is the assistant (draft) model's confidence "
                              "and prompt lookup guesses without one: drop it, or use an assistant model")
        if self.assistant_early_exit is not None and self.prompt_lookup_num_tokens is not None:
            raise ConfigError("generate.assistant_early_exit and prompt_lookup_num_tokens both guess tokens: give one")
        if self.assistant_early_exit is not None and self.num_beams > 1:
            raise ConfigError(f"generate.assistant_early_exit speculates on one sequence and beam search (num_beams="
                              f"{self.num_beams}) keeps several: use one of them")
        if self.num_beams > 1 and self.prompt_lookup_num_tokens is not None:
            raise ConfigError(f"generate.prompt_lookup_num_tokens={self.prompt_lookup_num_tokens} speculates on one "
                              f"sequence and beam search (num_beams={self.num_beams}) keeps several: use one of them")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(f"generate.num_return_sequences={self.num_return_sequences} is more than "
                              f"num_beams={self.num_beams}: beam search returns at most num_beams sequences")
        if self.stop_strings is not None:
            if not all(self.stop_strings):
                raise ConfigError(f"generate.stop_strings={self.stop_strings!r} is invalid: a list of non-empty "
                                  "strings (an empty one would stop at once)")
            if self.num_beams > 1:
                raise ConfigError(f"generate.stop_strings={self.stop_strings!r} cannot be used with beam search "
                                  "(num_beams > 1): use stop_token_ids, or num_beams=1")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @property
    def scoring(self) -> tuple:
        """What turns a row's logits into its next token: rows with equal keys are scored as one group."""
        constraints = (self.guidance_scale, self.repetition_penalty, self.no_repeat_ngram_size, self.presence_penalty,
                       self.frequency_penalty, self.min_new_tokens, self.encoder_repetition_penalty, self.min_length,
                       self.forced_bos_token_id, tuple(self.forced_eos_token_id or ()),
                       tuple(sorted((self.logit_bias or {}).items())),
                       tuple(sorted((self.sequence_bias or {}).items())),
                       tuple(tuple(ids) for ids in self.bad_words_ids or ()), tuple(self.suppress_tokens or ()),
                       tuple(self.begin_suppress_tokens or ()), tuple(self.exponential_decay_length_penalty or ()),
                       tuple(tuple(ids) for ids in self.guided_choice_ids or ()), self.guided_pattern,
                       self.watermark_settings)
        if self.is_greedy:
            return (True, None, None, None, None, None, None, None, None, *constraints)
        return (False, self.temperature, self.top_h, self.top_k, self.top_p, self.min_p, self.typical_p,
                self.epsilon_cutoff, self.eta_cutoff, *constraints)

    @property
    def watermark_settings(self) -> Optional[Watermark]:
        """The watermark decoding adds (None: off)."""
        if not self.watermark:
            return None
        from lmforge.generate.watermark import Watermark

        return Watermark(self.watermark_greenlist_ratio, self.watermark_bias, self.watermark_key,
                         self.watermark_scheme, self.watermark_context_width)

    @property
    def guided_pattern(self) -> Optional[str]:
        """The regular expression decoding is held to: guided_regex, or guided_json's schema as one (None: neither)."""
        if self.guided_json is None:
            return self.guided_regex
        from lmforge.generate.json_schema import json_schema_regex

        try:
            schema = json.loads(self.guided_json)
        except json.JSONDecodeError as e:
            raise ConfigError(f"generate.guided_json is not valid JSON ({e.msg} at character {e.pos}): give a JSON "
                              "schema") from None
        return json_schema_regex(schema)

    def check_vocabulary(self, vocab_size: int) -> None:
        """The token ids logit_bias, sequence_bias, negative_prompt_ids, bad_words_ids, suppress_tokens,
        begin_suppress_tokens, guided_choice_ids and the forced tokens name must be the model's."""
        fields = {"logit_bias": list(self.logit_bias or {}),
                  "sequence_bias": [t for seq in self.sequence_bias or {} for t in seq],
                  "suppress_tokens": list(self.suppress_tokens or ()),
                  "begin_suppress_tokens": list(self.begin_suppress_tokens or ()),
                  "negative_prompt_ids": list(self.negative_prompt_ids or ()),
                  "bad_words_ids": [t for seq in self.bad_words_ids or () for t in seq],
                  "guided_choice_ids": [t for seq in self.guided_choice_ids or () for t in seq],
                  "forced_bos_token_id": [t for t in [self.forced_bos_token_id] if t is not None],
                  "forced_eos_token_id": list(self.forced_eos_token_id or ())}
        field, bad = next(((f, t) for f, ids in fields.items() for t in ids if t >= vocab_size), (None, None))
        if bad is not None:
            raise ConfigError(f"generate.{field} names the token id {bad}, outside the vocabulary (0 to "
                              f"{vocab_size - 1})")

    def new_tokens(self, prompt_len: int) -> int:
        """The new-token budget after a prompt of prompt_len tokens: max_length if set, else max_new_tokens."""
        if self.max_length is not None:
            if self.max_length <= prompt_len:
                raise ConfigError(f"generate.max_length={self.max_length} leaves no room after a prompt of "
                                  f"{prompt_len} tokens; raise it or set max_new_tokens")
            return self.max_length - prompt_len
        return self.max_new_tokens if self.max_new_tokens is not None else 100

    def end_ids(self, end_id: Optional[int]) -> list[int]:
        """The token ids that end a sequence: the tokenizer's end token and stop_token_ids."""
        ids = [end_id] if end_id is not None else []
        return ids + [t for t in (self.stop_token_ids or []) if t not in ids]


def _sequence_bias_pairs(pairs: Union[list, tuple]) -> dict:
    """Hugging Face's form of sequence_bias, [[token ids, bias], ...], as the dict {(token ids...): bias}."""
    out = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, str):  # text that is not IDS:BIAS
            raise ConfigError(f"generate.sequence_bias={list(pairs)!r} is invalid: IDS:BIAS pairs, comma-separated, "
                              "the ids of a sequence separated by spaces ('10 45:-5,7:2.5')")
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], (list, tuple))):
            raise ConfigError(f"generate.sequence_bias[{i}]={pair!r} is invalid: a pair [token ids, bias] as Hugging "
                              "Face writes it ([[10, 45], -5.0]), or give a dict {(10, 45): -5.0}")
        out[tuple(pair[0])] = pair[1]
    return out


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerateConfig)}
