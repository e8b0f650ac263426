"""`lmforge export --format onnx`: an lmforge checkpoint -> one ONNX graph, input_ids -> logits.

    input_ids  int64 (batch, sequence)          both axes dynamic; sequence <= block_size
    logits     float32 (batch, sequence, vocab)

The graph is the full forward pass without a KV cache (each call recomputes the whole sequence), so
any ONNX runtime (onnxruntime in Python, C++, C#, Java, JavaScript; onnx-tf for TensorFlow) can score
text or decode greedily by calling it again with the longer sequence. The model is traced with its
attention written out (the `reference` path, equal to the fused kernel), which every exporter and
runtime understands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from pathlib import Path

import torch

from lmforge.checkpoint import load_for_inference
from lmforge.errors import LmforgeError
from lmforge.model import GPT

OPSET = 18


class OnnxExportError(LmforgeError):
    """A checkpoint that cannot be exported to ONNX, or an output that must not be replaced."""


def export_onnx(checkpoint: str | Path, out_path: str | Path, *, force: bool = False) -> Path:
    """Write the checkpoint (a run directory: its newest complete checkpoint) as an ONNX file; return its path."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise OnnxExportError(f"{out_path} exists; choose another --out or pass --force to replace it")
    try:
        import onnx  # noqa: F401  (the exporter writes with onnx and translates with onnxscript)
        import onnxscript  # noqa: F401
    except ModuleNotFoundError:
        raise OnnxExportError("ONNX export needs the onnx package: pip install 'lmforge[onnx]' "
                              "(or pip install onnx onnxscript)") from None
    trained, _, _ = load_for_inference(checkpoint, "cpu")
    model = GPT(dataclasses.replace(trained.config, attention="reference", dropout=0.0))
    model.load_state_dict(trained.state_dict())
    model.eval()
    example = torch.zeros(2, min(8, model.config.block_size), dtype=torch.long)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=model.config.block_size)
    try:
        with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=["input_ids"], output_names=["logits"],
                              dynamic_shapes={"idx": {0: batch, 1: sequence}}, opset_version=OPSET,
                              dynamo=True, external_data=False, verbose=False)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Hide a library's warnings (the exporter lists optional packages it skips) for the duration."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)
