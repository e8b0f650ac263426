"""Loss, perplexity and bits per byte of a language model on a token split.

The split is cut into consecutive non-overlapping windows of block_size tokens (the last one shorter)
and every token after the first is predicted once, so the result is deterministic and independent of
the batch size up to float rounding. With a stride below block_size the windows overlap (Hugging Face's
"perplexity of fixed-length models"): a window starts every `stride` tokens and predicts only the tokens no earlier
window predicted, so every token after the first is still predicted once, each but the first window's with at
least block_size - stride tokens before it (a lower, truer perplexity for block_size / stride times the compute):

    loss        = sum of -ln p(token | previous tokens in its window) / number of predicted tokens  (nats)
    perplexity  = exp(loss)
    bits/byte   = sum of -ln p / (ln 2 * UTF-8 bytes of the predicted text)

Bits per byte compares models with different tokenizers (a char, byte and BPE model predict the same
bytes). The byte count is the manifest's per-split count when the whole split is evaluated and the
manifest has one, else the byte length of the decoded predicted tokens (special tokens add no bytes).

An encoder (model.causal false) sees every token, so a next-token loss, and a perplexity from it, would measure
copying. It is scored as it was trained, on masked tokens (BERT's rule, data.batches.mask_tokens) in the same
consecutive windows, each window masked from (MASK_SEED, its start): every evaluation of a split asks the same
questions, whatever the batch size or the model, so two encoders compare on the same masked positions.

    loss             = sum of -ln p(original token | the masked window) / number of masked positions  (nats)
    masked_accuracy  = share of masked positions whose most probable token is the original
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batches import IGNORE_INDEX, mask_tokens
from lmforge.errors import ConfigError, DataError
from lmforge.eval.progress import progress_bar

MASK_SEED = 0  # the masking of an encoder's evaluation: fixed, so every model answers the same masked positions


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 16,
                    device: torch.device | str = "cpu", progress: bool = False,
                    stride: Optional[int] = None) -> dict[str, float]:
    """Summed and mean next-token loss of `model` over the whole 1-D array `tokens` (with a progress bar on a
    terminal when `progress`), in windows of block_size input tokens starting every `stride` tokens (default
    block_size: no overlap), each predicting the tokens no earlier window predicted.

    Returns {'loss_sum' (nats), 'tokens' (predicted), 'loss', 'perplexity'}.
    """
    n = len(tokens)
    if n < 2:
        raise DataError(f"need at least 2 tokens to evaluate, got {n}")
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ConfigError(f"stride {stride} is invalid: use 1 to block_size ({block_size})")
    was_training = model.training
    model.eval()
    windows = []  # (start, inputs, targets kept): targets are tokens[start+1 .. start+inputs], the last `kept` new
    covered = 0  # the last token index some window predicts
    for start in range(0, n - 1, stride):
        length = min(block_size, n - 1 - start)
        windows.append((start, length, start + length - covered))
        covered = start + length
        if covered == n - 1:
            break
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    full = [w for w in windows if w[1] == block_size]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in windows
                                                                                 if w[1] < block_size]
    with progress_bar(n - 1, "eval", "tok", progress) as bar:
        for group in groups:
            length = group[0][1]
            rows = np.stack([np.asarray(tokens[s:s + length + 1], dtype=np.int64) for s, _, _ in group])  # (B, T+1)
            rows = torch.from_numpy(rows).to(device)
            hidden = model.hidden_states(rows[:, :-1])  # (B, T, C)
            keep = torch.cat([torch.arange(b * length + length - k, (b + 1) * length) for b, (_, _, k) in
                              enumerate(group)]).to(device)  # the new targets of each window, flattened
            # the head and the loss only where counted, a chunk at a time: the (kept, V) logits never exist whole
            loss = model.token_loss(hidden.reshape(-1, hidden.size(-1))[keep], rows[:, 1:].reshape(-1)[keep], 1024)
            loss_sum += loss.double()
            bar.update(len(keep))
    predicted = n - 1
    model.train(was_training)
    total = float(loss_sum)
    mean = total / predicted
    return {"loss_sum": total, "tokens": predicted, "loss": mean, "perplexity": math.exp(min(mean, 700.0))}


@torch.no_grad()
def evaluate_masked_tokens(model: nn.Module, tokens: np.ndarray, block_size: int, mask_id: int, vocab_size: int,
                           probability: float = 0.15, batch_size: int = 16, device: torch.device | str = "cpu",
                           seed: int = MASK_SEED, progress: bool = False) -> dict[str, float]:
    """Masked-language-model loss and accuracy of an encoder over the whole 1-D array `tokens`.

    Consecutive windows of block_size tokens (the last one shorter), each masked with probability `probability`
    by a generator seeded with (seed, the window's start). Returns {'loss_sum' (nats), 'masked' (positions
    scored), 'loss', 'masked_accuracy'}.
    """
    n = len(tokens)
    full = [s for s in range(0, n, block_size) if s + block_size <= n]
    last = [s for s in range(0, n, block_size) if s + block_size > n]  # at most one shorter window at the end
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in last]
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # (loss, masked, hits)
    with progress_bar(n, "eval", "tok", progress) as bar:
        for group in groups:
            length = min(block_size, n - group[0])
            masked = [mask_tokens(torch.from_numpy(np.asarray(tokens[s:s + length], dtype=np.int64))[None], mask_id,
                                  vocab_size, probability, np.random.default_rng([seed, s])) for s in group]
            x = torch.cat([inputs for inputs, _ in masked]).to(device)  # (B, T)
            y = torch.cat([labels for _, labels in masked]).to(device)  # (B, T): IGNORE_INDEX where not masked
            logits = model(x)  # (B, T, V)
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="sum").double()
            totals[1] += (y != IGNORE_INDEX).sum()
            totals[2] += (logits.argmax(-1) == y).sum()  # IGNORE_INDEX never equals a prediction
            bar.update(x.numel())
    model.train(was_training)
    loss_sum, count, hits = totals.tolist()
    if count == 0:
        raise DataError(f"none of the {n} tokens was masked (probability {probability}): evaluate more tokens")
    return {"loss_sum": loss_sum, "masked": int(count), "loss": loss_sum / count, "masked_accuracy": hits / count}


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    """Summed loss in nats converted to bits, per byte of text."""
    if num_bytes <= 0:
        return float("nan")
    return loss_sum_nats / (math.log(2) * num_bytes)


def split_bytes(manifest: dict, split: str) -> Optional[int]:
    """UTF-8 byte count of a split's text if the manifest records one (splits.<split>.bytes), else None."""
    entry = (manifest.get("splits") or {}).get(split) or {}
    for key in ("bytes", "utf8_bytes", "text_bytes"):
        if isinstance(entry.get(key), int):
            return entry[key]
    return None


def predicted_bytes(tokenizer: Any, tokens: np.ndarray, chunk: int = 1 << 20) -> int:
    """UTF-8 bytes of the text of tokens[1:] (the predicted ones), decoded a chunk at a time.

    Every tokenizer maps each id to a fixed byte string, so the count adds up over chunks; a document's first token
    (after a start token) counts the bytes it adds to a text's start (a SentencePiece-style tokenizer's first-word
    space is no text).
    """
    tokens = np.asarray(tokens)
    total = sum(len(tokenizer.decode_bytes(tokens[s:s + chunk].tolist(), skip_special=True))
                for s in range(1, len(tokens), chunk))
    if getattr(tokenizer, "writes_first_space", False):
        for i in np.flatnonzero(tokens[:-1] == tokenizer.start_id) + 1:
            first = int(tokens[i])
            if first not in tokenizer.special_token_ids:
                total -= len(tokenizer.id_to_bytes(first)) - len(tokenizer.text_start_bytes(first))
    return total


def text_tokens(inputs: list[str], tokenizer: Any) -> np.ndarray:
    """The token stream of text files, folders or globs (.txt, .jsonl, .parquet), read and cleaned as `prepare`
    reads a corpus, each document written as training saw one: <START> text <END>."""
    from lmforge.data.corpus import CorpusReader, find_files, warn_stderr

    skipped: list[str] = []  # a skipped file is a warning, or the reason in the error when nothing is left
    files = find_files(inputs, warn=skipped.append)
    start = [] if tokenizer.start_id is None else [tokenizer.start_id]
    pieces = [np.asarray(start + tokenizer.encode(doc) + [tokenizer.end_id], dtype=np.int64)
              for doc in CorpusReader(warn=skipped.append).documents(files)]
    if not pieces:
        raise DataError(f"{', '.join(inputs)} holds no text to evaluate"
                        + (f" ({skipped[0]})" if skipped else " (empty or blank)") + ": pass UTF-8 text")
    for message in skipped:
        warn_stderr(message)
    return np.concatenate(pieces)


def evaluate_checkpoint(path: str | Path, data_dir: Optional[str | Path] = None, split: str = "val",
                        max_tokens: Optional[int] = None, batch_size: int = 16, device: str = "auto",
                        task_options: Optional[dict[str, Any]] = None, progress: bool = False,
                        stride: Optional[int] = None, texts: Optional[list[str]] = None) -> dict[str, Any]:
    """Evaluate a run or checkpoint directory on a split of prepared data, or on text files (`texts`: paths,
    folders or globs, encoded with the checkpoint's tokenizer, see text_tokens).

    data_dir defaults to the data the run was trained on (data.path in its config). max_tokens limits
    the evaluation to the first N tokens of the split. stride: windows overlap, starting every `stride` tokens
    (evaluate_tokens). Returns {'loss', 'perplexity', 'bits_per_byte', 'tokens' (predicted), 'bytes', 'stride',
    'split', 'checkpoint', 'data'} ('text' instead of 'split' and 'data' for texts); for an encoder {'objective':
    'mlm', 'loss', 'masked_accuracy', 'masked_tokens', 'tokens', 'mask_probability', 'mask_seed', 'split',
    'checkpoint', 'data'} (evaluate_masked_tokens) and no perplexity, which would measure copying. On task data (a
    fine-tuned model) it returns eval.tasks.evaluate_task_split's metrics instead; task_options (max_examples, out,
    generate) go to it. progress: a progress bar on stderr when it is a terminal (eval.progress).
    """
    from lmforge.checkpoint import check_data_tokenizer, load_for_inference, verified_checkpoint
    from lmforge.data.shards import load_split, read_manifest

    ckpt, ckpt_manifest = verified_checkpoint(path)  # a run's newest intact checkpoint
    model, tokenizer, config = load_for_inference(ckpt, device=device, manifest=ckpt_manifest)
    if stride is not None and not config.model.causal:
        raise ConfigError("--stride overlaps the windows of a next-token loss, and an encoder is scored on masked "
                          "tokens: drop --stride")
    if texts:
        if tokenizer is None:
            raise DataError(f"{ckpt} has no tokenizer.json, so text cannot be encoded: evaluate prepared data")
        tokens = text_tokens(texts, tokenizer)
        manifest, where = {}, {"text": list(texts), "checkpoint": str(ckpt)}
        data_dir = None
    else:
        data_dir = Path(data_dir) if data_dir is not None else Path(config.data.path)
        from lmforge.data.tasks import is_task_data

        if is_task_data(data_dir):  # a fine-tuned model: task metrics and predictions (eval.tasks)
            if stride is not None:
                raise ConfigError(f"{data_dir} is task data, scored by task metrics: drop --stride")
            from lmforge.eval.tasks import evaluate_task_split

            return evaluate_task_split(model, tokenizer, config, ckpt, data_dir, split, batch_size=batch_size,
                                       progress=progress, **(task_options or {}))
        manifest = read_manifest(data_dir)
        check_data_tokenizer(ckpt, data_dir / "tokenizer.json")
        if manifest.get("vocab_size") != config.model.vocab_size:
            raise DataError(f"{data_dir} has vocab_size {manifest.get('vocab_size')} but the checkpoint's model has "
                            f"{config.model.vocab_size}; evaluate on the data the model was trained on")
        tokens = load_split(data_dir, split)
        where = {"split": split, "checkpoint": str(ckpt), "data": str(data_dir)}
    if (task_options or {}).get("assistant"):
        raise ConfigError("an assistant (draft) model speeds up generation, and evaluating a language model on "
                          "tokens generates nothing: drop --assistant-model (it serves fine-tuned text-to-text models)")
    whole = max_tokens is None or max_tokens >= len(tokens)
    if not whole:
        tokens = tokens[:max_tokens]
    device_t = next(model.parameters()).device
    if not config.model.causal:
        from lmforge.tokenizer import Tokenizer

        mask_source = tokenizer if texts else Tokenizer.load(data_dir / "tokenizer.json")
        mask_id, p = mask_source.mask_id, config.train.mlm_probability
        if mask_id is None:  # check_data_tokenizer found the model's own tokenizer: it was trained without one
            raise DataError(f"{data_dir or ckpt}'s tokenizer has no mask token, so this encoder cannot be scored on "
                            f"masked tokens: evaluate on data prepared with --mask-token")
        masked = evaluate_masked_tokens(model, tokens, config.model.block_size, mask_id, config.model.vocab_size, p,
                                        batch_size, device_t, progress=progress)
        return {"objective": "mlm", "loss": masked["loss"], "masked_accuracy": masked["masked_accuracy"],
                "masked_tokens": masked["masked"], "tokens": len(tokens), "mask_probability": p,
                "mask_seed": MASK_SEED, **where}
    result = evaluate_tokens(model, tokens, config.model.block_size, batch_size, device_t, progress=progress,
                             stride=stride)
    num_bytes = split_bytes(manifest, split) if whole and not texts else None
    if num_bytes is None:
        if tokenizer is None:
            from lmforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
        num_bytes = predicted_bytes(tokenizer, tokens)
    return {"loss": result["loss"], "perplexity": result["perplexity"],
            "bits_per_byte": bits_per_byte(result["loss_sum"], num_bytes), "tokens": result["tokens"],
            "bytes": num_bytes, "stride": stride or config.model.block_size, **where}
