"""Attention maps: what each head of each layer looks at, softmax(Q K^T / sqrt(d_k)) for one text.

    weights = attention_weights(model, idx)            # (n_layer, n_head, T, T) for the token ids idx (T,)
    weights, labels = attention_maps("runs/x", "to be or not to be")   # a text, through the run's tokenizer
    draw_attention(weights, labels, "attn.png", layers=[0], heads=[1])

Row t of a map is the distribution query t puts over the keys: it sums to 1, and a decoder's upper triangle is 0.

The maps come from the very q and k each layer's forward hands to its attention function (after RoPE, with
the grouped key heads the model shares), and the mask it passes (a decoder's causal triangle, an encoder's
whole text): `recording` wraps each layer's attention function while one forward pass runs and keeps its
arguments. The weights are then the model's own reference path, `reference_attention`, applied to them with
V = I: weights @ I is the weights. So they follow the formula exactly whichever path the model runs (the fused
sdpa kernel by default), with no second copy of the formula here.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.files import atomic_path
from lmforge.model import GPT, reference_attention

MAX_SHOWN = 64  # tokens drawn per axis: beyond this the labels cannot be read, so a long text is clipped


@contextlib.contextmanager
def recording(model: GPT) -> Iterator[list[dict[str, Any]]]:
    """While inside, each layer's attention function also appends its arguments by name (q, k, v, mask, ...)
    to the yielded list, one entry per call, in layer order; the functions are restored on leaving."""
    calls: list[dict[str, Any]] = []
    layers = [block.attn for block in model.blocks]
    originals = [layer.attend for layer in layers]

    def recorder(attend: Any) -> Any:
        signature = inspect.signature(attend)

        def record(*args: Any, **kwargs: Any) -> torch.Tensor:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append(dict(bound.arguments))
            return attend(*args, **kwargs)
        return record

    try:
        for layer, attend in zip(layers, originals):
            layer.attend = recorder(attend)
        yield calls
    finally:
        for layer, attend in zip(layers, originals):
            layer.attend = attend


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """(n_layer, n_head, T, T) float32 attention weights of `model` on one sequence of token ids idx (T,) or
    (1, T): entry [l, h, t, s] is how much query t of head h in layer l attends to key s."""
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(1, -1)  # (1, T)
    T, block_size = idx.size(1), model.config.block_size
    if T > block_size:
        raise ConfigError(f"the text is {T} tokens, longer than the model's context of {block_size}: shorten it")
    was_training = model.training
    model.eval()
    try:
        with recording(model) as calls:
            model(idx.to(model.tok_emb.weight.device))
    finally:
        model.train(was_training)
    maps = []
    for call in calls:
        k = call["k"]  # (1, nkv, S, hd): V = I (S, S) per key head turns the output into the weights
        identity = torch.eye(k.size(-2), dtype=k.dtype, device=k.device).expand(*k.shape[:2], -1, -1)
        maps.append(reference_attention(**{**call, "v": identity, "dropout_p": 0.0})[0])  # (nh, T, S)
    return torch.stack(maps).float().cpu()


def _model_and_tokenizer(model_or_path: Any, device: str) -> tuple[GPT, Any]:
    """A GPT and its tokenizer from a run or checkpoint directory, or from what lmforge.load returned."""
    if isinstance(model_or_path, (str, Path)):
        from lmforge.checkpoint import load_for_inference

        model, tokenizer, _ = load_for_inference(model_or_path, device)
    else:
        model, tokenizer = model_or_path.model, model_or_path.tokenizer
    if not isinstance(model, GPT):
        raise LmforgeError(f"attention maps read an lmforge GPT, not a {type(model).__name__}: load the model "
                           "without compile")
    if tokenizer is None:
        raise LmforgeError("this checkpoint holds no tokenizer to encode the text with: use attention_weights(model, "
                           "token_ids)")
    return model, tokenizer


def token_label(tokenizer: Any, token_id: int) -> str:
    """A token as an axis label: its text, with spaces as a middle dot and newlines and tabs escaped."""
    text = tokenizer.token_text(token_id)
    return text.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") or "''"


def attention_maps(model_or_path: Any, text: str, device: str = "cpu") -> tuple[torch.Tensor, list[str]]:
    """(weights (n_layer, n_head, T, T), the T token labels) for `text` as the model reads it: <START> + the
    text's tokens (generate.prompt_ids: the way training documents begin). `model_or_path` is a run or
    checkpoint directory (trained, fine-tuned or made by `lmforge import`) or what lmforge.load returned."""
    from lmforge.generate import prompt_ids

    model, tokenizer = _model_and_tokenizer(model_or_path, device)
    ids = prompt_ids(tokenizer, text)
    return attention_weights(model, ids), [token_label(tokenizer, i) for i in ids]


def check_choice(what: str, value: Optional[int], count: int) -> list[int]:
    """[value], or every index 0..count-1 when value is None; ConfigError when it is out of range."""
    if value is None:
        return list(range(count))
    if not 0 <= value < count:
        raise ConfigError(f"--{what} {value} is out of range: this model has {count} {what}s, numbered 0 to "
                          f"{count - 1}")
    return [value]


def draw_attention(weights: torch.Tensor, labels: Sequence[str], out: str | Path,
                   layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None,
                   title: str = "") -> Optional[str]:
    """Write a PNG of the maps of `layers` x `heads` (default all: a grid, one row per layer) to `out`, the
    tokens as axis labels; returns the note about clipping when the text has more than MAX_SHOWN tokens
    (only the first MAX_SHOWN queries and keys are drawn), else None."""
    from matplotlib.figure import Figure  # a bare Figure renders to files without pyplot's global state

    layers = list(range(weights.size(0))) if layers is None else list(layers)
    heads = list(range(weights.size(1))) if heads is None else list(heads)
    T = weights.size(-1)
    n = min(T, MAX_SHOWN)
    note = f"showing the first {n} of {T} tokens" if T > n else None
    panel = min(max(2.0, 0.16 * n + 1.0), 40.0 / max(len(layers), len(heads)))  # inches per map
    readable = panel / n >= 0.11  # room for a 6-point label per token
    fig = Figure(figsize=(panel * len(heads) + 1.5, panel * len(layers) + 1.0), layout="constrained")
    axes = fig.subplots(len(layers), len(heads), squeeze=False)
    for row, layer in enumerate(layers):
        for col, head in enumerate(heads):
            ax = axes[row][col]
            image = ax.imshow(weights[layer, head, :n, :n].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ticks = range(n) if readable else []
            ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
            if row == len(layers) - 1:
                ax.set_xlabel("key (attended to)", fontsize=7)
            if col == 0:
                ax.set_ylabel("query", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    lines = [title, "softmax(Q K^T / sqrt(d_k)) per layer and head; each row sums to 1", note,
             None if readable else "too many maps to label the tokens: pick one with --layer and --head"]
    fig.suptitle("\n".join(line for line in lines if line), fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # the temporary name has no .png: say the format
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=100, bbox_inches="tight")
    return note
