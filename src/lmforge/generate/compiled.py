"""A decoding step compiled ahead of time: one new token per row, run from C++ (AOTInductor).

At batch 1 a decoding step reads every weight once; for the small models a CPU runs, eager PyTorch spends
as long again dispatching the ~30 operations of each layer from Python. Here torch.export traces one step
through the model as written (lmforge.model with a static KVCache view: the cache's buffers are fixed,
the attention reads their first S columns, S a symbolic size), AOTInductor compiles it once into a shared
library, and every later step, whatever its context length, runs the library: no recompiles across
lengths, no Python between kernels. A model gets at most two libraries, compiled on first use (each takes
some seconds on a CPU): batch 1, and batch >= 2 (the compiler treats a size-1 batch as a special case).
Prefill and the window slide stay eager: they run once per prompt and once per block_size/2 tokens.

    compiled = apply_compile(model)       # a CompiledGPT: called like the model (eager), and
    compiled.decode_step(tokens, keys, cache)   # one compiled step; used by generate's Sequences
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge.model import GPT, KVCache


class DecodeStep(torch.nn.Module):
    """What is compiled: logits (B, V) of the token after `tokens` (B, 1), whose key/value go to column
    `column` (1,) of the cache buffers (n_layer keys then n_layer values, each (B, nkv, max_len, hd)),
    attending to the first S columns where keys (B, S) is True (written, not a pad). S < max_len."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, keys: torch.Tensor, column: torch.Tensor,
                *buffers: torch.Tensor) -> torch.Tensor:
        n = len(buffers) // 2
        cache = KVCache.static_view(buffers[:n], buffers[n:], column, keys.size(1))
        return self.model(tokens, cache, keys)[:, -1]


class CompiledGPT(torch.nn.Module):
    """`model` with its decoding step compiled: calling it runs the eager model (prefill, beam reorders,
    anything with more than one new token per row); decode_step runs the compiled step."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model.eval()
        self.libraries: dict[bool, Any] = {}  # batch of one? -> the loaded AOTInductor library

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def tok_emb(self) -> torch.nn.Embedding:
        return self.model.tok_emb

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def last_logits(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.last_logits(*args, **kwargs)

    def new_cache(self, batch_size: int) -> KVCache:
        """A cache for decode_step: one spare column, so the attention length S is always below the
        buffers' length (the compiled code would otherwise special-case S = max_len)."""
        weight = self.model.tok_emb.weight
        return KVCache(self.model.config, batch_size, self.model.config.block_size + 1, weight.device, weight.dtype)

    def decode_step(self, tokens: torch.Tensor, keys: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) after the new tokens (B, 1) at column cache.pos of `cache` (from new_cache), which
        then advances by one; keys (B, cache.pos + 1) bool marks the real columns, the new one included."""
        B = tokens.size(0)
        if (B == 1) not in self.libraries:
            self.libraries[B == 1] = self._compile(B == 1, keys.dtype)
        column = torch.full((1,), cache.pos, dtype=torch.long, device=tokens.device)
        logits = self.libraries[B == 1]([tokens.contiguous(), keys.contiguous(), column, *cache.k, *cache.v])
        cache.pos += 1
        return logits

    def _compile(self, single: bool, mask_dtype: torch.dtype) -> Any:
        """Export and compile DecodeStep for batch 1 (single) or any batch of 2 or more, any length."""
        config, weight = self.model.config, self.model.tok_emb.weight
        B = 1 if single else 2
        batch = torch.export.Dim.STATIC if single else torch.export.Dim("B", min=2, max=65536)
        length = torch.export.Dim("S", min=2, max=config.block_size)
        # Example tensors are made here, outside inference mode (the caller's are inference tensors); torch's
        # own deprecation notes from export are not the user's business.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            example = self.new_cache(B)
            args = (torch.zeros(B, 1, dtype=torch.long, device=weight.device),
                    torch.ones(B, 2, dtype=mask_dtype, device=weight.device),
                    torch.zeros(1, dtype=torch.long, device=weight.device), *example.k, *example.v)
            dims = ({0: batch}, {0: batch, 1: length}, {0: torch.export.Dim.STATIC},
                    tuple({0: batch} for _ in example.k + example.v))
            program = torch.export.export(DecodeStep(self.model), args, dynamic_shapes=dims)
            with tempfile.TemporaryDirectory(prefix="lmforge-step-") as workdir:
                package = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(Path(workdir) / "step.pt2"))
                library = torch._inductor.aoti_load_package(package)
        loader = getattr(library, "loader", None)
        if loader is not None and hasattr(loader, "boxed_run"):  # the inputs are one flat list of tensors already:
            return lambda inputs: loader.boxed_run(inputs)[0]     # skip __call__'s re-reading of its call spec
        return lambda inputs: library(*inputs)


def apply_compile(model: GPT) -> CompiledGPT:
    """The model with its decoding step compiled ahead of time (see the module docstring); greedy tokens
    equal the eager model's up to float rounding in the order of sums."""
    return model if isinstance(model, CompiledGPT) else CompiledGPT(model)
