"""`lmforge serve`: an OpenAI-compatible HTTP API over a trained checkpoint: completions and chat for a language
model, POST /v1/classify for a classifier (model.head: classify), POST /v1/reward for a reward model
(train.objective reward), POST /v1/embeddings for every model (an encoder: only that).

    config.py      ServeConfig: the limits (body size, token caps, concurrency, queue, timeouts, API key, hosts)
    app.py         the FastAPI app: endpoints, request checks and caps, Host/Origin and API key, server-sent events
    connections.py uvicorn's settings: header deadline, keep-alive, connection cap
    metrics.py     GET /metrics in Prometheus' text format
    engine.py      the worker thread that owns the model: admission, micro-batching, cancellation, timeouts
                   (Engine for generation, ClassifyEngine for a classifier, RewardEngine for a reward model)
    playground.py  the page at / (prompt box, options, streamed text; a note for a classifier, a reward model or
                   an encoder)

    from lmforge.serve import ServeConfig, serve
    serve("runs/shakespeare", ServeConfig(api_key="secret"), port=8000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.serve.config import ServeConfig

__all__ = ["ServeConfig", "load_app", "serve"]


def load_app(path: str, config: Optional[ServeConfig] = None, device: str = "auto", host: str = "127.0.0.1",
             dtype: str = "fp32", quantize: Optional[str] = None, compile: bool = False):
    """The app over the checkpoint at `path` (a run directory: its newest intact checkpoint): a language model's
    generation endpoints, a classifier's /v1/classify (generate.load gives a TextClassifier for one), or a reward
    model's /v1/reward (a RewardModel), and
    /v1/embeddings for every model (an encoder trained with mlm serves only that). serve.assistant_model is
    loaded beside it (checked: a causal language model with the same tokenizer). dtype, quantize and compile as
    generate.load: int8 weights and the decoding step compiled ahead of time serve faster on a CPU."""
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.generate import load
    from lmforge.serve.app import create_app

    config = config or ServeConfig()
    ckpt = resolve_checkpoint(path)  # first: a corrupt newest checkpoint is skipped (and said so) once
    adapters, load_adapter = {}, None
    if config.lora_modules or config.allow_runtime_lora:  # the base in fp32 (its fingerprint), adapters, then dtype
        # (int8, nf4: quantized before the adapters, which fold onto the weights its layers compute with)
        from lmforge.errors import ConfigError
        from lmforge.generate import TextGenerator
        from lmforge.generate.api import load_adapters
        from lmforge.generate.quantize import apply_inference_dtype
        from lmforge.lora import base_fingerprint

        if compile:
            raise ConfigError("serve.lora_modules or allow_runtime_lora with --compile is not supported: each row "
                              "picks its adapters as it runs, which the compiled step cannot; leave --compile out")
        generator = load(str(ckpt), device=device)
        if not isinstance(generator, TextGenerator):
            raise ConfigError(f"serve.lora_modules and allow_runtime_lora adapt a language model, and {path} is not "
                              "one")
        fingerprint = base_fingerprint(generator.model)
        if quantize is not None:
            apply_inference_dtype(generator.model, dtype, quantize)

        def load_one(name: str, run: str) -> TextGenerator:  # allow_runtime_lora: one more, while serving
            return load_adapters(generator, {name: run}, path, fingerprint)[name]

        load_adapter = load_one
        adapters = load_adapters(generator, config.adapters, path, fingerprint)
        if quantize is None:
            apply_inference_dtype(generator.model, dtype)
    else:
        generator = load(str(ckpt), device=device, dtype=dtype, quantize=quantize, compile=compile,
                         assistant=config.assistant_model)
    run_name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    return create_app(generator, config, model_name=run_name or Path(path).resolve().name, host=host,
                      adapters=adapters, load_adapter=load_adapter)


def serve(path: str, config: Optional[ServeConfig] = None, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", log_level: str = "info", dtype: str = "fp32", quantize: Optional[str] = None,
          compile: bool = False) -> None:
    """Load the checkpoint at `path` and serve it with uvicorn until interrupted."""
    import uvicorn

    from lmforge.serve.connections import uvicorn_config

    config = config or ServeConfig()
    app = load_app(path, config, device, host, dtype, quantize, compile)
    server = uvicorn.Server(uvicorn_config(app, config, host, port, log_level, timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown was clean (as uvicorn.run)
        pass
    if not server.started:  # it could not bind (its log says why): uvicorn.run's exit status
        raise SystemExit(3)
