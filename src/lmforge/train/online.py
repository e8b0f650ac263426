"""Online preference training (online DPO, Guo et al. 2024; TRL's OnlineDPOTrainer): on-policy pairs at every step.

Offline DPO learns from pairs someone else's model wrote. Online, the model being trained writes them: for each
prompt of a batch of preference pairs (its own completions are not used), the policy as it is now samples two
completions (no gradients, eval mode, train.online_temperature, at most train.online_max_new_tokens tokens), a
reward model (train.online_reward_model, trained with train.objective reward on the same tokenizer) scores
[start] prompt completion [end] of each, and the higher one becomes the pair's chosen example. The pair batch that
comes out has the layout of the data's (data.batches.pair_batch: rows 2k chosen, 2k + 1 rejected, labels on the
completion and its end token), so the preference loss, its reference and the division by the global batch's pairs
are the offline ones.

A sample that ran out of tokens has no end token (and none is trained). A model whose vocabulary is larger than the
tokenizer's (a padded embedding, as many imported models have) never samples the ids past the tokenizer's: they have
no text for a reward function, and no row in a reward model's embedding. A prompt too long to leave room for the
completion loses its earliest tokens after the start token (data.batches.fit_context), as preparing shortens
prompts. Sampling is seeded from (train.seed, step, micro-batch), and each prompt's two samples from that seed
alone (generate.rows.row_generators: a prompt draws the same tokens alone or batched; the prompts of one micro-batch
share the two streams), so a resumed run samples what the uninterrupted one did, and W processes sample what one
process does with the same micro-batches (train.grad_accum) per step.

GRPO (train.preference_loss grpo) draws its groups the same way (OnlinePairs.groups): train.grpo_group_size samples
of each prompt, all kept, each with its advantage (preference_loss.group_advantages of the rewards). With
train.grpo_iterations > 1 a generation trains several steps: Rollouts keeps it, with the policy's log-probabilities
of the samples at sampling time, and goes into each process's state of a checkpoint taken inside the generation, so
a resumed run trains on the samples the uninterrupted one did.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from lmforge.data.batches import IGNORE_INDEX, Examples, fit_context, pad_examples
from lmforge.generate import GenerateConfig, generate_batch_ids
from lmforge.generate.reward import RewardModel
from lmforge.generate.rows import within_tokenizer
from lmforge.preference_loss import group_advantages


class RewardFunction:
    """train.online_reward_function: a user's Python functions as a judge, each NAME(prompts, completions,
    references) -> one float per completion (three lists of str of one length), their rewards summed (several,
    comma-separated: e.g. a format reward and a correctness reward, as TRL's list of reward_funcs). Each file or module
    is imported once; a call that raises, or returns anything but that many finite numbers, stops the run with one
    line naming the function."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fns = [(one.strip(), load_function(one.strip())) for one in spec.split(",")]
        short = [one.rpartition(":")[2] for one, _ in self.fns]
        self.names = [name if short.count(name) == 1 else one for name, (one, _) in zip(short, self.fns)]

    def __call__(self, prompts: list[str], completions: list[str], references: list[str]) -> dict[str, np.ndarray]:
        """{name: one reward per completion} of each function, named by its NAME (by its whole spec when two
        share a NAME): self.names, in the spec's order."""
        return {name: self.call(spec, fn, prompts, completions, references)
                for name, (spec, fn) in zip(self.names, self.fns)}

    @staticmethod
    def call(spec: str, fn: Callable[..., Any], prompts: list[str], completions: list[str], references: list[str]
             ) -> np.ndarray:
        from lmforge.errors import ConfigError

        try:
            out = fn(list(prompts), list(completions), list(references))
            rewards = [float(r) for r in out]
        except Exception as e:  # the user's code: name it, and what it raised
            raise ConfigError(f"train.online_reward_function {spec} failed: {type(e).__name__}: {e}") from None
        finite = all(math.isfinite(r) for r in rewards)
        if len(rewards) != len(completions) or not finite:
            raise ConfigError(f"train.online_reward_function {spec} must return one finite number per completion: "
                              f"got {len(rewards)} for {len(completions)}{'' if finite else ', not all finite'}")
        return np.asarray(rewards, dtype=np.float64)


def load_function(spec: str) -> Callable[..., Any]:
    """The function FILE.py:NAME (a file, imported under its own name) or package.module:NAME names; a ConfigError
    naming what is wrong otherwise."""
    from lmforge.errors import ConfigError

    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(f"train.online_reward_function {spec!r} is not FILE.py:NAME or package.module:NAME")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"train.online_reward_function: {where} does not exist: give the path of a .py file")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # a file or module that does not import
        raise ConfigError(f"train.online_reward_function: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"train.online_reward_function: {where} has no function {name}")
    return fn


class OnlinePairs:
    """Turns a batch of preference pairs into on-policy pairs: (x, y) of the batch's prompts, each with two of the
    policy's samples ranked by `judge` (a reward model) and/or `function` (a RewardFunction: their rewards add up,
    each times its weight in `weights`, {judge name: weight}, 1 when not there), and the samples' mean reward (module
    docstring)."""

    def __init__(self, judge: Optional[RewardModel], block_size: int, max_new_tokens: int, temperature: float,
                 seed: int, start_id: Any, end_id: int, pad_id: int, rows_per_prompt: int = 2,
                 function: Optional[RewardFunction] = None, tokenizer: Any = None,
                 weights: Optional[dict[str, float]] = None) -> None:
        self.judge, self.function, self.tokenizer = judge, function, tokenizer
        self.weights = dict(weights or {})
        self.block_size, self.max_new_tokens = block_size, max_new_tokens
        self.rows_per_prompt = rows_per_prompt  # 2: a batch of pairs (its chosen rows); 1: of sft examples
        self.last_parts: dict[str, float] = {}  # each judge's mean reward over the last call's samples
        self.last_lengths: list[int] = []  # the last groups' samples: new tokens of each (its end token aside)
        self.last_ended: list[bool] = []  # and whether each ended with the end token (else it ran out of tokens)
        self.temperature, self.seed = temperature, seed
        self.keep, self.end_id, self.pad_id = int(start_id is not None), end_id, pad_id

    def prompts(self, batch: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        """The prompt ([start] + prompt tokens) of each pair of a pair batch (of each example of an sft batch): the
        inputs of its chosen row up to the first labelled position, cut to at most block_size - max_new_tokens tokens
        (a full sample then makes a row of at most block_size + 1 tokens: block_size inputs)."""
        every = self.rows_per_prompt
        x, y = batch[0][0::every], batch[1][0::every]  # the chosen rows: their prompt is the pair's
        out = []
        for row, labels in zip(x.numpy(), y.numpy()):
            length = int(np.argmax(labels != IGNORE_INDEX)) + 1  # inputs up to the one that predicts the first label
            out.append(fit_context(row[:length], self.block_size - self.max_new_tokens, self.keep))
        return out

    def references(self, batch: tuple[torch.Tensor, ...]) -> Optional[list[str]]:
        """The data's own completion of each prompt of `batch` (a pair's chosen one, an sft example's), as text: what
        a reward function may compare a sample with (a reference answer); None without a reward function."""
        if self.function is None:
            return None
        every = self.rows_per_prompt
        return [self.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) for labels in batch[1][0::every]]

    @torch.no_grad()
    def sample(self, model: nn.Module, prompts: list[np.ndarray], n: int, step: int, micro: int,
               references: Optional[list[str]] = None) -> tuple[list[np.ndarray], list[int], np.ndarray]:
        """n samples of each prompt by `model` (eval mode, no gradients) and the judges' reward of each: (rows, each
        [start] + prompt + sample (+ end token where it ended), prompt-major; each row's prompt length; rewards (P, n)).
        references: the data's completion of each prompt (for a reward function)."""
        seed = int(np.random.SeedSequence([self.seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)
        config = within_tokenizer(GenerateConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                                 num_return_sequences=n, seed=seed),
                                  model.config.vocab_size, self.tokenizer)  # no id past the tokenizer's
        was_training = model.training
        model.eval()
        try:
            samples = generate_batch_ids(model, [p.tolist() for p in prompts], config, end_id=self.end_id)
        finally:
            model.train(was_training)
        rows, lengths = [], []
        for prompt, group in zip(prompts, samples):
            for ids in group:  # an end token where the sample ended, none where it ran out of tokens
                ended = [self.end_id] if len(ids) < self.max_new_tokens else []
                rows.append(np.concatenate([prompt, np.asarray(ids + ended, dtype=np.int64)]))
                lengths.append(len(prompt))
        parts: dict[str, np.ndarray] = {}  # each judge's rewards, summed below
        if self.judge is not None:
            judge_block = self.judge.model.config.block_size
            parts["reward_model"] = np.asarray(self.judge.score_ids([fit_context(r, judge_block, self.keep)
                                                                     for r in rows]), dtype=np.float64)
        if self.function is not None:
            decode = self.tokenizer.decode  # special tokens (start, end) dropped
            parts.update(self.function([decode(r[:k]) for r, k in zip(rows, lengths)],
                                       [decode(r[k:]) for r, k in zip(rows, lengths)],
                                       [text for text in (references or [""] * len(prompts)) for _ in range(n)]))
        rewards = np.zeros(len(rows))
        for name, values in parts.items():
            rewards += self.weights.get(name, 1.0) * values
        self.last_parts = {name: float(values.mean()) for name, values in parts.items()}  # the log's: each unweighted
        return rows, lengths, rewards.reshape(len(prompts), n)

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...], step: int, micro: int
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        prompts = self.prompts(batch)
        rows, lengths, rewards = self.sample(model, prompts, 2, step, micro, self.references(batch))
        order = []
        for k in range(len(prompts)):  # the higher reward first: chosen, then rejected (a tie keeps the draw order)
            order += [2 * k, 2 * k + 1] if rewards[k, 0] >= rewards[k, 1] else [2 * k + 1, 2 * k]
        return self.rows_batch(rows, lengths, order), float(np.mean(rewards))

    def groups(self, model: nn.Module, batch: tuple[torch.Tensor, ...], n: int, step: int, micro: int,
               scale: bool = True, mask_truncated: bool = False
               ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """GRPO's batch: n samples of each prompt of a pair batch as (x, y, advantages) rows (prompt-major: rows
        k n .. k n + n - 1 are prompt k's; labels on each sample and its end token, none on a sample that ran out of
        tokens when mask_truncated; advantages (P n,) of preference_loss.group_advantages, scaled or not), and their
        rewards (P, n) float32."""
        rows, lengths, rewards = self.sample(model, self.prompts(batch), n, step, micro, self.references(batch))
        self.last_ended = [int(row[-1]) == self.end_id and len(row) > k for row, k in zip(rows, lengths)]
        self.last_lengths = [len(row) - k - ended for row, k, ended in zip(rows, lengths, self.last_ended)]
        rewards = torch.from_numpy(rewards).float()
        x, y = self.rows_batch(rows, lengths, range(len(rows)))
        if mask_truncated:  # DAPO's overlong filtering: a sample with no end token trains nothing
            y[torch.tensor([int(row[-1]) != self.end_id for row in rows])] = IGNORE_INDEX
        return (x, y, group_advantages(rewards, scale).flatten()), rewards

    def rows_batch(self, rows: list[np.ndarray], lengths: list[int], order: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the rows in `order`, padded, labels on each row's tokens after its prompt."""
        order = list(order)
        examples = Examples(np.concatenate([rows[i] for i in order]),
                            np.concatenate([[0], np.cumsum([len(rows[i]) for i in order])]).astype(np.int64),
                            np.asarray([lengths[i] for i in order], dtype=np.int64))
        return pad_examples(examples, np.arange(len(order)), self.pad_id)


@dataclass
class Rollouts:
    """One generation of GRPO samples, trained for train.grpo_iterations steps: each micro-batch's (x, y, advantages,
    log-probabilities at sampling time), the samples' mean reward and each judge's part of it (what the log shows at
    every step of the generation)."""

    batches: list[tuple[torch.Tensor, ...]]
    reward: float
    parts: dict[str, float] = field(default_factory=dict)
    lengths: dict[str, float] = field(default_factory=dict)  # completion_length, truncated_fraction (the log's)

    DTYPES = (torch.long, torch.long, torch.float32, torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe and exact: ids as ints, float32 values as the floats they are (JSON keeps a double exactly)."""
        return {"batches": [[t.tolist() for t in batch] for batch in self.batches], "reward": self.reward,
                "parts": self.parts, "lengths": self.lengths}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Rollouts":
        batches = [tuple(torch.tensor(values, dtype=dtype)  # (x, y, advantages), and pi_old when kept
                         for values, dtype in zip(batch, cls.DTYPES[:max(len(batch), 3)], strict=True))
                   for batch in state["batches"]]
        return cls(batches, float(state["reward"]), {str(k): float(v) for k, v in state["parts"].items()},
                   {str(k): float(v) for k, v in state.get("lengths", {}).items()})


def load_online_pairs(config: Any, tokenizer_file: Any, pad_id: int, device: torch.device, rows_per_prompt: int = 2
                      ) -> OnlinePairs:
    """The OnlinePairs of train.online_reward_model, checked: a reward model whose tokenizer is the data's (its ids
    are read as they are), and a context with room for train.online_max_new_tokens after a prompt; rows_per_prompt 2
    for pair batches, 1 for sft batches (GRPO)."""
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.errors import ConfigError
    from lmforge.files import sha256_file
    from lmforge.generate import load
    from lmforge.tokenizer import Tokenizer

    tc, block = config.train, config.model.block_size
    if tc.online_max_new_tokens >= block:
        raise ConfigError(f"train.online_max_new_tokens={tc.online_max_new_tokens} leaves no room for a prompt in the "
                          f"model's context (block_size {block}): lower it")
    judge = None
    if tc.online_reward_model is not None:
        ckpt = resolve_checkpoint(tc.online_reward_model)
        judge = load(str(ckpt), device=str(device), template=False)
        if not isinstance(judge, RewardModel):
            raise ConfigError(f"train.online_reward_model {tc.online_reward_model} is not a reward model: train one "
                              "with `lmforge train --train.objective reward` on preference data")
        theirs = ckpt / "tokenizer.json"
        if tokenizer_file is None or not theirs.is_file() or sha256_file(theirs) != sha256_file(tokenizer_file):
            raise ConfigError(f"train.online_reward_model {tc.online_reward_model} reads another tokenizer than this "
                              "data's: train the reward model on data prepared with this model's tokenizer")
    function = RewardFunction(tc.online_reward_function) if tc.online_reward_function is not None else None
    names = (function.names if function is not None else []) + (["reward_model"] if judge is not None else [])
    weights = dict(zip(names, tc.reward_weights, strict=True)) if tc.online_reward_weights is not None else None
    tok = Tokenizer.load(tokenizer_file)
    return OnlinePairs(judge, block, tc.online_max_new_tokens, tc.online_temperature, tc.seed, tok.start_id,
                       tok.end_id, pad_id, rows_per_prompt, function, tok, weights)
