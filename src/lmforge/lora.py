"""LoRA: low-rank adapters on a frozen GPT, applied from outside the model (Hu et al. 2021, eq. 3).

A targeted Linear y = x W^T + b becomes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T      A (r, in), B (out, r), W and b frozen

with B = 0 at init, so the adapted model starts as the base model exactly. Only A and B train. With lora.dora
(DoRA, Liu et al. 2024) each adapted row also has a trained magnitude m (see LoRALinear):

    y_i = m_i / ||(W + (alpha / r) B A)_i|| * (x (W + (alpha / r) B A)_i^T) + b_i      m starts at ||W_i||

Targets name what to adapt (LoRAConfig.targets), mapped onto the model's Linear layers:

    q, k, v   their slices of the fused attn.qkv output ([q; k; v], sizes nh*hd, nkv*hd, nkv*hd), one A, B each
    o         attn.proj (W^O), whole
    mlp       mlp.fc (gate and up fused, for swiglu) and mlp.proj, whole
    head      lm_head, whole; refused when lm_head is tied to tok_emb (merging would change the embedding too), and
              for a classifier, whose head (HEADS) trains whole
    emb       tok_emb's table (LoRAEmbedding: peft's lora_embedding_A / _B); a tied lm_head reads the adapted table
              (TiedLoRAHead), so merging changes both alike

`apply_lora` replaces each such nn.Linear by a `LoRALinear` that keeps the same weight and bias Parameters
under the same names, so an adapted model's state_dict is the plain model's plus the adapters, named
`<linear>.lora.<target>.{A,B}`:

    blocks.0.attn.qkv.lora.q.A    (r, C)         blocks.0.attn.qkv.lora.q.B    (nh*hd, r)
    blocks.0.attn.qkv.lora.v.A    (r, C)         blocks.0.attn.qkv.lora.v.B    (nkv*hd, r)
    blocks.0.attn.proj.lora.o.A   (r, nh*hd)     blocks.0.mlp.fc.lora.mlp.A    (r, C)       lm_head.lora.head.B (V, r)
    blocks.0.attn.qkv.lora.q.magnitude (nh*hd,)  with DoRA only

With lora.quantize nf4 (QLoRA, Dettmers et al. 2023) the blocks' Linear layers keep their frozen weights in 4 bits
(lmforge.nf4: bitsandbytes' NF4 bytes), a LoRALinear computing its frozen product through its NF4Linear; merging
dequantizes them (the values the run computed with), and base_fingerprint counts the 4-bit bytes. With lora.init
loftq (Li et al. 2023) the adapters start at what the 4 bits lose (loftq_start), so the 4-bit base plus the adapters
starts near the base in full.

Apply it before wrapping the model (DDP, FSDP, torch.compile add prefixes to these names).
`merge_lora` folds the adapters into the weights and gives back a plain GPT; `base_fingerprint` hashes the
frozen weights, so adapters saved on one base can refuse another.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import LoRAConfig, LoRATarget
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import GPT
from lmforge.model import dropout as make_dropout
from lmforge.nf4 import NF4Linear, dequantize_blocks, quantize_blocks, round_trip

Target = LoRATarget  # what LoRAConfig.targets names; LoRAConfig lives in config (a RunConfig section), re-exported here
WHOLE_LINEARS = {"o": ("attn.proj",), "mlp": ("mlp.fc", "mlp.proj")}  # target -> Linears of each block it adapts
HEADS = ("classifier",)  # task heads a LoRA run trains whole beside the adapters (a new head has no base to adapt)
ROW_WEIGHTS = ("tok_emb.weight", "lm_head.weight")  # a row per token: added tokens' rows train (train_added_rows)


# ------------------------------------------------------------------------------------------ adapters
class Adapter(nn.Module):
    """One low-rank update B A, (size, in), for `size` output features of a Linear starting at `start`; with DoRA
    also their magnitudes m (size,), set by LoRALinear to the norms of the weight's rows. With `offset` (lora.init
    pissa or olora) A and B start at A0, B0 (buffers, kept) that LoRALinear computes from the weight, and the update
    is B A - B0 A0: zero at the start, as peft's W - s B0 A0 + s B A with the weight left as it is."""

    def __init__(self, in_features: int, start: int, size: int, r: int, device: torch.device,
                 dtype: torch.dtype, dora: bool = False, offset: bool = False) -> None:
        super().__init__()
        self.start, self.size = start, size
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(size, r, device=device, dtype=dtype))
        # A as nn.Linear initialises a (r, in) weight (as Microsoft's loralib); B = 0 makes B A = 0 (Hu et al. sec. 4.1)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.magnitude = nn.Parameter(torch.empty(size, device=device, dtype=dtype)) if dora else None
        self.register_buffer("A0", torch.zeros_like(self.A) if offset else None)
        self.register_buffer("B0", torch.zeros_like(self.B) if offset else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.A), self.B)  # (..., in) -> (..., r) -> (..., size)
        return y if self.A0 is None else y - F.linear(F.linear(x, self.A0), self.B0)

    def delta(self) -> torch.Tensor:
        """B A (- B0 A0) in fp32, (size, in): what the adapter adds to its rows of the weight."""
        return sum(b.float() @ a.float() for a, b in self.terms())

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The low-rank products the update sums, as (A, B) pairs: [(A, B)], or [(A, B), (A0, -B0)] with an offset."""
        return [(self.A, self.B)] + ([] if self.A0 is None else [(self.A0, -self.B0)])


def initial_adapters(weight: torch.Tensor, r: int, scale: float, init: str, niter: Optional[int] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) in fp32 for the rows `weight` (out, in), as peft's pissa_init / olora_init compute
    them. pissa (Meng et al. 2024): W = U S V^T, A0 = sqrt(S_r / s) V_r^T, B0 = U_r sqrt(S_r / s), so s B0 A0 is W's
    best rank-r approximation (with `niter`, U_r, S_r, V_r from torch.svd_lowrank(W, r, niter): randomized, drawn
    from torch's global generator, close to the best); olora (Buyukakyuz 2024): W = Q R, A0 = R[:r], B0 = Q[:, :r]."""
    if r > min(weight.shape):
        raise ConfigError(f"lora.init={init} takes r={r} directions of a {tuple(weight.shape)} weight, which has at "
                          f"most {min(weight.shape)}: lower lora.r, or use lora.init default")
    w = weight.detach().float()
    if init == "pissa":
        if niter is None:
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        else:
            U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
            Vh = V.t()
        root = torch.sqrt(S[:r] / scale)
        return root[:, None] * Vh[:r], U[:, :r] * root
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def loftq_start(weight: torch.Tensor, slices: dict[str, tuple[int, int]], r: int, scale: float, iterations: int,
                double: bool = False) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """LoftQ (Li et al. 2023, peft's loftq_init) for a Linear's `weight` (out, in) with adapters on `slices`:
    (the weight to store in 4 bits, {slice: (A (r, in), B (size, r))}) such that round_trip(stored) + s B A is near
    W on each slice's rows. Each of `iterations` steps quantizes W less the last adapters' product (W itself at
    first), then takes A, B from the top-r singular vectors of what that loses, E = W - round_trip(stored), as PiSSA
    does from W (A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s): s B A is E's best rank-r approximation). Rows no
    adapter covers are stored as W. fp32."""
    if r > min(weight.shape):
        raise ConfigError(f"lora.init=loftq takes r={r} directions of a {tuple(weight.shape)} weight, which has at "
                          f"most {min(weight.shape)}: lower lora.r, or use lora.init default")
    w = weight.detach().float()
    stored, starts = w, {}
    for step in range(iterations):
        lost = w - round_trip(stored, double)
        starts = {name: initial_adapters(lost[start:start + size], r, scale, "pissa")
                  for name, (start, size) in slices.items()}
        if step + 1 < iterations:  # the next step quantizes what the adapters leave over
            stored = w.clone()
            for name, (start, size) in slices.items():
                A, B = starts[name]
                stored[start:start + size] -= scale * (B @ A)
    return stored, starts


class LoRALinear(nn.Module):
    """A frozen Linear plus adapters on slices of its output: forward(x (..., in)) -> (..., out).

    `slices` maps a name to (start, size), output features start..start+size-1, each with its own A, B
    (default: one adapter "all" over the whole output). The Linear's weight and bias Parameters are kept
    as they are (the same objects, under the same names) and frozen.

    dora (Liu et al. 2024, DoRA): each adapted row of the weight is a magnitude times a direction,
    W'_i = m_i (W + s B A)_i / ||(W + s B A)_i||, with m (trained) starting at ||W_i||, so the model starts as the base;
    the norm is taken without gradient (the paper's sec. 4.3, as peft does). The output is computed as peft's
    DoraLinearLayer does, y + (m / n - 1) x W^T + (m / n) s x A^T B^T (x dropped out for both terms while training
    with dropout), so y - b is never scaled twice.
    """

    def __init__(self, base: Union[nn.Linear, NF4Linear], r: int, alpha: float, dropout: float = 0.0,
                 slices: Optional[dict[str, tuple[int, int]]] = None, dora: bool = False,
                 init: str = "default", niter: Optional[int] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # QLoRA (lora.quantize nf4): the frozen weight in 4 bits, an NF4Linear computing the frozen product
        self.nf4 = base if isinstance(base, NF4Linear) else None
        self.weight = None if self.nf4 is not None else base.weight  # (out, in)
        self.bias = base.bias  # (out,) or None
        if self.weight is not None:
            self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        slices = {"all": (0, self.out_features)} if slices is None else slices
        ordered = sorted(slices.items(), key=lambda item: item[1][0])
        end = 0
        for name, (start, size) in ordered:
            if start < end or size < 1 or start + size > self.out_features:
                raise ValueError(f"LoRA slice {name}=({start}, {size}) overlaps another or leaves the "
                                 f"{self.out_features} output features")
            end = start + size
        device, dtype = (self.nf4.packed.device, torch.float32) if self.nf4 is not None else (self.weight.device,
                                                                                             self.weight.dtype)
        offset = init in ("pissa", "olora")  # (LoftQ's adapters start as part of the model: apply_lora sets them)
        self.lora = nn.ModuleDict({name: Adapter(self.in_features, start, size, r, device, dtype, dora, offset)
                                   for name, (start, size) in ordered})  # in output order, for forward
        self.scale = alpha / r
        self.drop = make_dropout(dropout)
        self.merged = False  # True while the adapters are folded into weight (see merge)
        self.enabled = True  # False inside adapters_off: the frozen base alone
        self.merged_norms: dict[str, torch.Tensor] = {}  # DoRA while merged: each adapter's row norms (unmerge)
        if offset and device.type != "meta":  # PiSSA / OLoRA: A and B start at A0, B0 of the rows
            with torch.no_grad():
                for adapter in self.lora.values():
                    A0, B0 = initial_adapters(self.frozen_weight()[adapter.start:adapter.start + adapter.size], r,
                                              self.scale, init, niter)
                    for tensor, value in ((adapter.A, A0), (adapter.B, B0), (adapter.A0, A0), (adapter.B0, B0)):
                        tensor.copy_(value)
        if dora and device.type != "meta":
            with torch.no_grad():
                for adapter in self.lora.values():
                    adapter.magnitude.copy_(self.row_norms(adapter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.nf4 is None else self.nf4(x)  # (..., out)
        if self.merged or not self.enabled:
            return y
        h = self.drop(x)  # (..., in)
        adapters = list(self.lora.values())  # in output order, not overlapping
        if all(adapter.magnitude is None for adapter in adapters):
            if sum(adapter.size for adapter in adapters) == self.out_features:  # the whole output: one addition
                update = torch.cat([adapter(h) for adapter in adapters], dim=-1) if len(adapters) > 1 else \
                    adapters[0](h)
                return y + update * self.scale  # (rounded as peft rounds it: scaled, then added)
            for adapter in adapters:  # some slices: each update added in place (the frozen product's backward reads
                y[..., adapter.start:adapter.start + adapter.size] += adapter(h) * self.scale  # x, not y)
            return y
        # DoRA (every adapter of the layer has its magnitudes): its update reads its rows of y (for m's gradient), so
        # the output is cut at the slices and joined again
        pieces, end = [], 0
        for adapter in adapters:  # untouched, adapted, untouched, ... rows
            start, stop = adapter.start, adapter.start + adapter.size
            rows = y[..., start:stop]
            rows = rows + self.dora_update(adapter, rows, h)
            pieces += [y[..., end:start], rows]
            end = stop
        pieces.append(y[..., end:])
        return torch.cat(pieces, dim=-1)  # (..., out)

    @torch.no_grad()
    def dequantize(self) -> None:
        """A QLoRA layer's 4-bit weight made a dense, frozen Parameter of the values it computed with (fp32): the
        layer computes the same from then on, in full precision. Nothing for other layers."""
        if self.nf4 is not None:
            self.weight, self.nf4 = nn.Parameter(self.nf4.dense(), requires_grad=False), None

    def frozen_weight(self) -> torch.Tensor:
        """W, (out, in): the weight Parameter, or the NF4 weight dequantized (fp32) for a QLoRA layer."""
        return self.weight if self.nf4 is None else self.nf4.dense()

    def row_norms(self, adapter: Adapter) -> torch.Tensor:
        """||(W + s B A)_i|| of the adapter's rows, (size,), in the weight's dtype, without gradient."""
        with torch.no_grad():
            rows = self.frozen_weight()[adapter.start:adapter.start + adapter.size]
            return torch.linalg.vector_norm(rows + self.scale * adapter.delta().to(rows.dtype), dim=1)

    def dora_update(self, adapter: Adapter, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the adapter's rows y (..., size) of the frozen output: (g - 1) x W^T + g s x A^T B^T,
        g = m / ||W + s B A|| per row; x is h (dropped out) when dropout acts, else the frozen y less its bias."""
        start, stop = adapter.start, adapter.start + adapter.size
        g = adapter.magnitude / self.row_norms(adapter)  # (size,)
        if isinstance(self.drop, nn.Identity) or not self.training:
            plain = y if self.bias is None else y - self.bias[start:stop]
        else:
            plain = F.linear(h, self.frozen_weight()[start:stop])
        return (g - 1) * plain + g * (self.scale * adapter(h))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale * B A into the weight rows of each slice (DoRA: then scale each row to its magnitude m);
        forward is then the plain Linear. For inference: adapters get no gradient while merged. `unmerge` takes
        them out again. A QLoRA layer's weight is dequantized first (see dequantize)."""
        if self.merged:
            return
        self.dequantize()
        for name, adapter in self.lora.items():
            rows = self.weight[adapter.start:adapter.start + adapter.size]  # (size, in), a view
            if adapter.magnitude is None:
                rows += (self.scale * adapter.delta()).to(rows.dtype)
                continue
            norms = self.row_norms(adapter)
            self.merged_norms[name] = norms
            g = (adapter.magnitude.float() / norms.float())[:, None]
            rows.copy_((g * (rows.float() + self.scale * adapter.delta())).to(rows.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take out what `merge` put in (equal to the weight before merging up to rounding)."""
        if not self.merged:
            return
        for name, adapter in self.lora.items():
            rows = self.weight[adapter.start:adapter.start + adapter.size]
            if adapter.magnitude is None:
                rows -= (self.scale * adapter.delta()).to(rows.dtype)
                continue
            g = (adapter.magnitude.float() / self.merged_norms.pop(name).float())[:, None]
            rows.copy_((rows.float() / g - self.scale * adapter.delta()).to(rows.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        slices = ", ".join(f"{n}=({a.start}, {a.size})" for n, a in self.lora.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}, {slices}"


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding plus a low-rank update of its table (peft's lora_embedding_A / lora_embedding_B):

        E'[i] = E[i] + s * B A[:, i]        A (r, V) starts at zeros, B (C, r) normal: E' starts as E (peft's init)

    one Adapter "emb" (in_features V, rows 0..C-1: its delta B A is (C, V), the table's update transposed). The
    weight Parameter is kept as it is, frozen. A tied lm_head reads the same table: apply_lora makes it a
    TiedLoRAHead over this adapter, so the model computes with E' on both sides, as merged (and as peft's
    ensure_weight_tying ties the head's adapter to the embedding's). No dropout: peft applies none to embeddings.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.weight = base.weight  # (V, C)
        self.weight.requires_grad_(False)
        self.lora = nn.ModuleDict({"emb": Adapter(self.num_embeddings, 0, self.embedding_dim, r, self.weight.device,
                                                  self.weight.dtype)})
        with torch.no_grad():
            self.lora["emb"].A.zero_()
            self.lora["emb"].B.normal_()
        self.scale = alpha / r
        self.merged = False
        self.enabled = True

    @property
    def active(self) -> bool:
        return not self.merged and self.enabled

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx, self.weight)  # (..., C)
        if not self.active:
            return y
        adapter = self.lora["emb"]
        return y + self.scale * F.linear(F.embedding(idx, adapter.A.t()), adapter.B)  # (..., r) -> (..., C)

    def table_delta(self) -> torch.Tensor:
        """s (B A)^T in fp32, (V, C): what the adapter adds to the table."""
        return self.scale * self.lora["emb"].delta().t()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.table_delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.table_delta().to(self.weight.dtype)
            self.merged = False


class TiedLoRAHead(nn.Module):
    """A tied lm_head (its weight the embedding's table E) whose embedding a LoRAEmbedding adapts: logits
    x E'^T = x E^T + s (x B) A, through the embedding's own adapter (not a module of this one: the adapter is saved
    and trained once). forward(x (..., C)) -> (..., V)."""

    def __init__(self, head: nn.Linear, embedding: LoRAEmbedding) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, None  # the embedding's table
        self.__dict__["embedding"] = embedding  # a reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.embedding.active:
            return y
        adapter = self.embedding.lora["emb"]
        return y + self.embedding.scale * F.linear(F.linear(x, adapter.B.t()), adapter.A.t())


ADAPTED = (LoRALinear, LoRAEmbedding)  # the modules that hold adapters (a TiedLoRAHead borrows its embedding's)


# --------------------------------------------------------------------------------- applying, merging
def lora_plan(model: GPT, config: LoRAConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """{Linear's name in the model: {target: (start, size) of its output}} for config.targets."""
    c = model.config
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    qkv_slices = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}  # [q; k; v] along attn.qkv's output
    plan: dict[str, dict[str, tuple[int, int]]] = {}
    for target in config.targets:
        if target == "head":
            if c.head == "classify":  # a low-rank update of a head that trains whole adds nothing it could not learn
                raise ConfigError("lora.targets has head, but this model is a classifier (model.head: classify), "
                                  "whose classification head a LoRA run trains whole: drop head from lora.targets")
            head = model.lm_head.base if isinstance(model.lm_head, AdapterSwitch) else model.lm_head
            if getattr(head, "weight", None) is model.tok_emb.weight:
                raise ConfigError("lora.targets has head, but this model's lm_head is tied to tok_emb "
                                  "(model.tie_embeddings=true) and merging would change the embedding too: "
                                  "drop head from lora.targets, or adapt a model trained with tie_embeddings=false")
            plan["lm_head"] = {"head": (0, model.lm_head.out_features)}
            continue
        for i, block in enumerate(model.blocks):
            if target in qkv_slices:
                plan.setdefault(f"blocks.{i}.attn.qkv", {})[target] = qkv_slices[target]
            for path in WHOLE_LINEARS.get(target, ()):
                plan[f"blocks.{i}.{path}"] = {target: (0, block.get_submodule(path).out_features)}
    return plan


def apply_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Freeze every parameter of `model` and replace the Linear layers config.targets names by LoRALinear
    (in place; the adapters are created on the weights' device and dtype, A from torch's global generator); with
    config.quantize nf4 (QLoRA) the blocks' Linear layers are stored in 4 bits first (nf4.quantize_blocks, their
    maxima in 8 bits with config.double_quant; not on the meta device, where only shapes matter). Returns the model.
    Raises ConfigError for head on a tied lm_head, ValueError if it has adapters already."""
    if any(isinstance(m, ADAPTED) for m in model.modules()):
        raise ValueError("the model has LoRA adapters already; apply_lora once, to a plain model")
    plan = lora_plan(model, config)
    model.requires_grad_(False)
    real = not model.tok_emb.weight.is_meta
    starts = {}  # LoftQ: each layer's weight to quantize, and its adapters' start
    if config.init == "loftq" and real:
        with torch.no_grad():
            for name, slices in plan.items():
                linear = model.get_submodule(name)
                stored, starts[name] = loftq_start(linear.weight, slices, config.r, config.scale, config.loftq_iter,
                                                   config.double_quant)
                linear.weight.copy_(stored)
    if config.quantize == "nf4" and real:
        quantize_blocks(model, double=config.double_quant)
    for name, slices in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), config.r, config.plain_alpha, config.dropout, slices, config.dora,
                           config.init, config.pissa_niter)
        with torch.no_grad():
            for adapter_name, (A, B) in starts.get(name, {}).items():
                layer.lora[adapter_name].A.copy_(A)
                layer.lora[adapter_name].B.copy_(B)
        setattr(parent, child, layer)
    if "emb" in config.targets:
        tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.tok_emb.weight
        model.tok_emb = LoRAEmbedding(model.tok_emb, config.r, config.plain_alpha)
        if tied:
            model.lm_head = TiedLoRAHead(model.lm_head, model.tok_emb)
    return model


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its weight and put a plain nn.Linear back in its place (the same weight and bias
    Parameters, still frozen): the model is an ordinary GPT again, its state_dict keys those of a plain one.
    QLoRA's 4-bit layers become plain ones holding the weights they computed with (nf4.dequantize_blocks).
    In place; returns the model. Irreversible at this level (LoRALinear.merge/unmerge keep the adapters)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, TiedLoRAHead)):  # (a tied head's table: merged with its embedding)
            if isinstance(module, LoRALinear):
                module.merge()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
        elif isinstance(module, LoRAEmbedding):
            module.merge()
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
            embedding.weight = module.weight
            model.tok_emb = embedding
    return dequantize_blocks(model)


def dequantize_lora(model: GPT) -> GPT:
    """A QLoRA model (lora.quantize) with every 4-bit weight made a dense one holding the values it computed with,
    adapters kept (LoRALinear.dequantize, nf4.dequantize_blocks): it computes the same, in full precision, and its
    state_dict is a LoRA model's again. In place; returns the model."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.dequantize()
    return dequantize_blocks(model)


# ------------------------------------------------------------------------- several adapters on one base
class AdapterSwitch(nn.Module):
    """A frozen Linear (`base`: an nn.Linear, or a quantized one such as generate.quantize.Int8Linear) with several
    named sets of adapters (a StackedAdapters each): the set use_adapter names on the calling thread (for the batch, or
    per row) turns the base's output into its own, no set leaves it as it is. One copy of a base serves the LoRA runs
    trained on it (vLLM's --lora-modules): add_adapter_set puts them on."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        self.sets = nn.ModuleDict()  # name -> StackedAdapters

    def dense(self) -> nn.Linear:
        """The base as an nn.Linear (a meta module holding its weight and bias; a quantized base's weight dequantized,
        fp32): what a LoRALinear is built on to fold a run's adapters (DoRA's row norms read the weight)."""
        if isinstance(self.base, nn.Linear):
            weight, bias = self.base.weight, self.base.bias
        else:
            weight, bias = (None if t is None else nn.Parameter(t, requires_grad=False)
                            for t in (self.base.dense_weight(), self.base.bias))
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight, linear.bias = weight, bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _switched(self.sets, x, self.base(x), lambda adapted, x, y: adapted.apply_(x, y, self.base.bias))


class EmbeddingSwitch(nn.Module):
    """A frozen nn.Embedding (its weight kept as `weight`, the same Parameter) with several named sets of table
    adapters (an EmbeddingSet each), chosen as AdapterSwitch's are: a LoRA run that adapted the embedding (lora.targets
    emb), served beside its base."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.weight = base.weight
        self.sets = nn.ModuleDict()  # name -> EmbeddingSet

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _switched(self.sets, idx, F.embedding(idx, self.weight), lambda adapted, idx, y: adapted.apply_(idx, y))


class EmbeddingSet(nn.Module):
    """One run's table adapter for inference: A^T (V, r) and s B (C, r); apply_(idx, y) adds s B A[:, idx] to the
    rows y = E[idx] in place (LoRAEmbedding's output)."""

    def __init__(self, At: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("At", At)
        self.register_buffer("B", B)

    def apply_(self, idx: torch.Tensor, y: torch.Tensor) -> None:
        y.add_(F.linear(F.embedding(idx, self.At), self.B))


def _switched(sets: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor,
              apply: Callable[[nn.Module, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """y, the base's output for x, with the sets use_adapter chose applied (apply(set, x, y) changes y in place):
    one set (or none) for the whole batch, or each row's own, its rows' update computed on them alone."""
    chosen = getattr(_ACTIVE, "chosen", None)
    if isinstance(chosen, str) or chosen is None:
        if chosen in sets:
            apply(sets[chosen], x, y)
        return y
    if x.size(0) != chosen.rows:
        raise ValueError(f"use_adapter named sets for {chosen.rows} rows, and the batch has {x.size(0)}")
    for name, rows in chosen.groups.items():
        if name not in sets:
            continue
        if isinstance(rows, slice):  # consecutive rows: views, changed in place
            apply(sets[name], x[rows], y[rows])
            continue
        rows = rows.to(x.device)
        part = y.index_select(0, rows)
        apply(sets[name], x.index_select(0, rows), part)
        y.index_copy_(0, rows, part)
    return y


class StackedAdapters(nn.Module):
    """The adapters of a LoRALinear folded for inference into two matrices: A of all of them stacked (m r, in), and
    B block-structured (out, m r) times the scale s, adapter j's s B on its rows in columns j r .. j r + r - 1, zeros
    elsewhere, so s x A^T B^T is every adapter's update on its own rows in two products (no slices to cut and join).
    DoRA's row gains g = m / ||W + s B A|| are fixed then too (1 on rows no adapter covers): apply_(x, y, b) turns the
    frozen output y = x W^T + b into g (y - b + s x A^T B^T) + b, LoRALinear's output (plain LoRA: y + s x A^T B^T)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, gain: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.register_buffer("A", A)  # (k, in)
        self.register_buffer("B", B)  # (out, k), the scale in it
        self.register_buffer("gain", gain)  # DoRA's (out,), or None

    @classmethod
    def fold(cls, module: LoRALinear) -> "StackedAdapters":
        """The set of a LoRALinear's adapters (as they are now)."""
        adapters = list(module.lora.values())
        terms = [(adapter, a, b) for adapter in adapters for a, b in adapter.terms()]  # (PiSSA: B A and -B0 A0)
        r = adapters[0].A.shape[0]
        weight = module.weight
        B = torch.zeros(module.out_features, r * len(terms), dtype=weight.dtype, device=weight.device)
        gain = torch.ones(module.out_features, dtype=weight.dtype, device=weight.device)
        for j, (adapter, _, b) in enumerate(terms):
            rows = slice(adapter.start, adapter.start + adapter.size)
            B[rows, j * r:(j + 1) * r] = b.detach()
            if adapter.magnitude is not None:
                gain[rows] = adapter.magnitude.detach() / module.row_norms(adapter)
        return cls(torch.cat([a.detach() for _, a, _ in terms]), B * module.scale,  # (m r, in), (out, m r)
                   gain if adapters[0].magnitude is not None else None)

    def apply_(self, x: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Make y (..., out), the frozen output x W^T + b of x (..., in), the adapted output, in place."""
        update = F.linear(F.linear(x, self.A), self.B)  # (..., out)
        if self.gain is None:
            y.add_(update)
            return
        if bias is not None:
            y.sub_(bias)
        y.add_(update).mul_(self.gain)
        if bias is not None:
            y.add_(bias)


SWITCHES = (AdapterSwitch, EmbeddingSwitch)  # what holds adapter sets


class RowSets(NamedTuple):
    """Per-row adapter sets of a batch (use_adapter with a list): `rows` rows, and for each set named its rows (rows
    that name none keep the base): a slice when they follow one another (callers put a batch's rows in set order),
    else their indices."""

    rows: int
    groups: dict[str, Union[slice, torch.Tensor]]  # name -> slice, or (k,) long row indices on the CPU


_ACTIVE = threading.local()  # use_adapter's choice, per thread: a server's embeddings thread keeps the base


@contextlib.contextmanager
def use_adapter(name: Union[None, str, Sequence[Optional[str]], RowSets]) -> Iterator[None]:
    """Inside the block, on this thread, every switch (AdapterSwitch, EmbeddingSwitch) computes with its set `name`
    (None, or a set it does not have: the base layer alone). A list names a set per row of the batch (dim 0 of the
    model's input): each row computes with its own, so requests of several LoRA runs share one decode (as punica /
    vLLM batch them); row_sets makes that list into what it keeps, once for a loop of steps."""
    chosen = name if name is None or isinstance(name, (str, RowSets)) else row_sets(name)
    previous = getattr(_ACTIVE, "chosen", None)
    _ACTIVE.chosen = chosen
    try:
        yield
    finally:
        _ACTIVE.chosen = previous


def row_sets(names: Sequence[Optional[str]]) -> Union[None, str, RowSets]:
    """What use_adapter keeps for per-row names: one name (or None) when every row names the same, else RowSets."""
    distinct = set(names)
    if len(distinct) == 1:
        return next(iter(distinct))
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(row)
    return RowSets(len(names), {name: slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else
                                torch.tensor(rows, dtype=torch.long) for name, rows in groups.items()})


@torch.no_grad()
def add_adapter_set(model: GPT, name: str, config: LoRAConfig, adapters: dict[str, torch.Tensor]) -> None:
    """Put the adapters of one LoRA run (its lora_state_dict: "blocks.0.attn.qkv.lora.q.A", ...; `config` its lora
    section) on `model`, a plain GPT or one with sets already, as the set `name`: each Linear config.targets names
    becomes an AdapterSwitch (once) holding those adapters (StackedAdapters: folded, for inference only).
    Strict as load_lora_state_dict: CheckpointError naming missing, unexpected or misshapen tensors."""
    if name in adapter_sets(model):
        raise ValueError(f"the model has an adapter set named {name!r} already")
    added: dict[str, LoRALinear] = {}
    for linear, slices in lora_plan(model, config).items():
        parent_name, _, child = linear.rpartition(".")
        parent = model.get_submodule(parent_name)
        switch = getattr(parent, child)
        if not isinstance(switch, AdapterSwitch):
            switch = AdapterSwitch(switch)
            setattr(parent, child, switch)
        added[linear] = LoRALinear(switch.dense(), config.r, config.plain_alpha, 0.0, slices, config.dora,
                                   config.init).eval()
    own = {f"{linear}.lora.{key}": t for linear, m in added.items() for key, t in m.lora.state_dict().items()}
    if "emb" in config.targets:  # the table's adapter, as LoRAEmbedding holds it: A (r, V), B (C, r)
        table = model.tok_emb.weight
        own.update({"tok_emb.lora.emb.A": table.new_empty(config.r, table.shape[0], device="meta"),
                    "tok_emb.lora.emb.B": table.new_empty(table.shape[1], config.r, device="meta")})
    missing, unexpected = [k for k in own if k not in adapters], [k for k in adapters if k not in own]
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"the adapters of {name!r} do not match their lora section: {'; '.join(parts)}")
    for key, tensor in own.items():
        if adapters[key].shape != tensor.shape:
            raise CheckpointError(f"adapter {key} of {name!r} has shape {tuple(adapters[key].shape)}, its lora "
                                  f"section's {tuple(tensor.shape)}")
        if not tensor.is_meta:
            tensor.copy_(adapters[key])
    for linear, module in added.items():
        model.get_submodule(linear).sets[name] = StackedAdapters.fold(module)
    if "emb" in config.targets:
        _add_table_set(model, name, config.scale, adapters["tok_emb.lora.emb.A"], adapters["tok_emb.lora.emb.B"])


def _add_table_set(model: GPT, name: str, scale: float, A: torch.Tensor, B: torch.Tensor) -> None:
    """The embedding's adapter (A (r, V), B (C, r)) as the set `name` of the table and, when the head is tied to it,
    of the head, whose logits read the adapted table: x E'^T = x E^T + s (x B) A (TiedLoRAHead's)."""
    if not isinstance(model.tok_emb, EmbeddingSwitch):
        model.tok_emb = EmbeddingSwitch(model.tok_emb)
    table = model.tok_emb.weight
    A, B = (t.detach().to(device=table.device, dtype=table.dtype) for t in (A, B))
    model.tok_emb.sets[name] = EmbeddingSet(A.t().contiguous(), scale * B)
    if model.config.tie_embeddings and model.config.head == "lm":
        if not isinstance(model.lm_head, AdapterSwitch):
            model.lm_head = AdapterSwitch(model.lm_head)
        model.lm_head.sets[name] = StackedAdapters(B.t().contiguous(), scale * A.t().contiguous())


def adapter_sets(model: nn.Module) -> set[str]:
    """The names of the adapter sets on `model` (add_adapter_set)."""
    return {name for m in model.modules() if isinstance(m, SWITCHES) for name in m.sets}


def remove_adapter_set(model: GPT, name: str) -> None:
    """Take the adapter set `name` (add_adapter_set) off every AdapterSwitch of `model`; ValueError if it has none."""
    switches = [m for m in model.modules() if isinstance(m, SWITCHES) and name in m.sets]
    if not switches:
        raise ValueError(f"the model has no adapter set named {name!r}")
    for switch in switches:
        del switch.sets[name]


# ------------------------------------------------------------------------------- adapter state dicts
@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes what its frozen base does: every adapter is skipped (the model DPO trains
    with LoRA is its own reference this way, with no copy). Refused while merged: the base is not apart then."""
    layers = [m for m in model.modules() if isinstance(m, ADAPTED)]
    if not layers:
        raise ValueError("adapters_off needs a model with LoRA adapters (apply_lora); this one has none")
    if any(m.merged for m in layers):
        raise ValueError("adapters_off needs unmerged adapters: the merged weights hold the base and the adapters")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, {"blocks.0.attn.qkv.lora.q.A": (r, C), ...} (see the module docstring),
    sharing storage with the model."""
    return {f"{name}.lora.{key}": tensor for name, module in model.named_modules() if isinstance(module, ADAPTED)
            for key, tensor in module.lora.state_dict().items()}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter Parameters (every A and B), in the order of lora_state_dict: what the optimizer trains."""
    return [p for module in model.modules() if isinstance(module, ADAPTED) for p in module.lora.parameters()]


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(sorted(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model prepared by apply_lora. Strict: every adapter of the model must be
    given and nothing else, each of its shape; otherwise CheckpointError naming the keys."""
    own = lora_state_dict(model)
    missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"LoRA adapters do not match the model: {'; '.join(parts)}; load them into a model "
                              f"prepared with the lora config (r, targets) they were trained with")
    for key, tensor in own.items():
        if state_dict[key].shape != tensor.shape:
            raise CheckpointError(f"LoRA adapter {key} has shape {tuple(state_dict[key].shape)}, the model's "
                                  f"{tuple(tensor.shape)}: load it with the lora.r and model it was trained with")
        tensor.copy_(state_dict[key])


def _is_head(name: str) -> bool:
    return name.split(".", 1)[0] in HEADS


def train_heads(model: nn.Module) -> list[str]:
    """Make the task heads (HEADS: a classification head) of an adapted model trainable again; return their
    parameter names. A LoRA run trains and saves them whole beside the adapters."""
    heads = {name: p for name, p in model.named_parameters() if _is_head(name)}
    for p in heads.values():
        p.requires_grad_(True)
    return list(heads)


def added_row_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} of the embedding and the lm_head (both names when tied) of a model with rows for tokens added to
    its base's tokenizer (GPT.resize_vocabulary set added_rows_from); {} for any other model."""
    if getattr(model, "added_rows_from", None) is None:
        return {}
    return {name: p for name, p in model.named_parameters(remove_duplicate=False) if name in ROW_WEIGHTS}


def train_added_rows(model: nn.Module) -> list[str]:
    """Let an adapted model learn the rows of tokens added to its base's tokenizer (rows added_rows_from.. of the
    embedding and of an untied lm_head; what peft's trainable_token_indices trains): those weights become trainable
    with a gradient hook that zeroes the base's rows, which AdamW then leaves exactly as they are (their moments stay
    0; optim.param_groups does not decay these weights). A LoRA checkpoint holds them whole (trained_state_dict).
    Returns their names; none for a model without added rows."""
    weights = added_row_weights(model)
    first = getattr(model, "added_rows_from", None)
    if weights and isinstance(getattr(model, "tok_emb", None), LoRAEmbedding):
        raise ConfigError(f"lora.targets has emb, and the data adds {model.config.vocab_size - first} token(s) to the "
                          "base's tokenizer, whose rows then train whole (an adapter of the table beside them is what "
                          "peft cannot save either): drop emb from lora.targets")
    for p in {id(p): p for p in weights.values()}.values():
        p.requires_grad_(True)
        p.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:first]), grad[first:]]))
    return list(weights)


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the adapters (lora_state_dict) plus the task heads' parameters
    ({"classifier.weight": (num_labels, C)} when the model has one) and, with tokens added to the base's tokenizer,
    the embedding and lm_head whole (added_row_weights), sharing storage with the model."""
    heads = {name: p for name, p in model.named_parameters() if _is_head(name)}
    return {**lora_state_dict(model), **heads, **added_row_weights(model)}


def is_adapted(model: nn.Module) -> bool:
    """Whether apply_lora put adapters into `model` (and they are not merged away)."""
    return any(isinstance(m, ADAPTED) for m in model.modules())


def base_fingerprint(model: nn.Module, adapters: bool = False) -> str:
    """Hex sha256 over the model's parameters that are not adapters and not task heads (HEADS, trained whole
    by a LoRA run), in name order: each name, dtype, shape and bytes. The same for a plain model and for it
    after apply_lora (names unchanged); a merged adapter is part of the weights. Tied weights count once.
    adapters=True: the adapters count too (what the adapted model computes, not only its base)."""
    skip = set() if adapters else set(lora_state_dict(model))
    h = hashlib.sha256()
    quantized = [(f"{name}.{key}", t) for name, m in model.named_modules() if isinstance(m, NF4Linear)
                 for key, t in m.named_buffers()]  # QLoRA's 4-bit weights: what those layers compute with
    for name, p in sorted([*model.named_parameters(), *quantized]):
        if name in skip or _is_head(name):
            continue
        if p.is_meta:
            raise ValueError(f"{name} is on the meta device: it has no values to fingerprint")
        h.update(f"{name}\0{str(p.dtype).removeprefix('torch.')}\0{tuple(p.shape)}\0".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
