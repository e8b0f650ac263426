"""`lmforge export --format onnx`: an lmforge checkpoint -> one ONNX graph, input_ids -> logits.

    input_ids  int64 (batch, sequence)          both axes dynamic; sequence <= block_size
    logits     float32 (batch, sequence, vocab)

The graph is the full forward pass without a KV cache (each call recomputes the whole sequence), so
any ONNX runtime (onnxruntime in Python, C++, C#, Java, JavaScript; onnx-tf for TensorFlow) can score
text or decode greedily by calling it again with the longer sequence. The model is traced with its
attention written out (the `reference` path, equal to the fused kernel), which every exporter and
runtime understands. The file records lmforge_version in its metadata; --force replaces only such a
file, through lmforge.files.atomic_path (the old file stays whole until the new one is complete).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path

import torch

from lmforge.checkpoint import load_for_inference
from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.files import atomic_path, check_output
from lmforge.model import GPT

OPSET = 18


class OnnxExportError(LmforgeError):
    """A checkpoint that cannot be exported to ONNX, or an output that must not be replaced."""


def export_onnx(checkpoint: str | Path, out_path: str | Path, *, force: bool = False) -> Path:
    """Write the checkpoint (a run directory: its newest complete checkpoint) as an ONNX file; return its path.

    An existing out_path is replaced only with force and only if it is an ONNX file lmforge wrote.
    """
    out_path = Path(out_path)
    try:
        import onnx  # noqa: F401  (the exporter writes with onnx and translates with onnxscript)
        import onnxscript  # noqa: F401
    except ModuleNotFoundError:
        raise OnnxExportError("ONNX export needs the onnx package: pip install 'lmforge[onnx]' "
                              "(or pip install onnx onnxscript)") from None
    check_output(out_path, force=force, ours=_is_onnx_export, what="an ONNX export written by lmforge",
                 error=OnnxExportError, directory=False, inputs=[checkpoint])
    trained, _, _ = load_for_inference(checkpoint, "cpu")
    if trained.config.head != "lm":
        raise OnnxExportError(f"{checkpoint} holds a {trained.config.head} model; ONNX export writes language "
                              "models (input_ids -> logits) only")
    model = GPT(dataclasses.replace(trained.config, attention="reference", dropout=0.0))
    model.load_state_dict(trained.state_dict())
    model.eval()
    example = torch.zeros(2, min(8, model.config.block_size), dtype=torch.long)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=model.config.block_size)
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), None, input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes={"idx": {0: batch, 1: sequence}}, opset_version=OPSET,
                                    dynamo=True, verbose=False)
    program.model.metadata_props["lmforge_version"] = __version__
    with atomic_path(out_path) as tmp:
        program.save(str(tmp), external_data=False)
    return out_path


def _is_onnx_export(path: Path) -> bool:
    """Whether `path` is an ONNX model that export_onnx wrote (its metadata records lmforge_version)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (protobuf's DecodeError and friends: not an ONNX file)
        return False
    return any(p.key == "lmforge_version" for p in model.metadata_props)


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
