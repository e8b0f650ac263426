"""PNG of a run's train and val loss curves, from RUN_DIR/metrics.jsonl (`lmforge plot RUN_DIR`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.errors import LmforgeError
from lmforge.files import atomic_path, check_output
from lmforge.train.metrics import read_metrics


def loss_curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{'train': (steps, losses), 'val': (steps, losses)}; a resumed run's repeated steps keep the latest value."""
    curves: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    for r in records:
        if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)):
            curves["train"][r["step"]] = r["loss"]
        elif r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float)):
            curves["val"][r["step"]] = r["val_loss"]
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in curves.items()}


# The image formats plot writes, by file suffix, and how each file begins (to recognise one --force may replace)
FORMATS = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


def _is_image(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(5).startswith(FORMATS[path.suffix.lower()])


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None, *, force: bool = False) -> Path:
    """Write the loss plot of `run_dir` to `out` (default RUN_DIR/loss.png, redrawn each time) and return its path.

    A given `out` must name a .png, .pdf or .svg file; an existing one is replaced only with `force`, and only
    if it is such an image (check_output): never a file of another kind."""
    run_dir = Path(run_dir)
    if out is not None:
        out = Path(out)
        if out.suffix.lower() not in FORMATS:
            raise LmforgeError(f"--out {out}: plot writes {', '.join(FORMATS)} images; give a name ending in one")
        check_output(out, force=force, ours=_is_image, what=f"a {out.suffix.lower()[1:].upper()} image",
                     directory=False, inputs=[run_dir / "metrics.jsonl"])
    records = read_metrics(run_dir)
    if not records:
        raise LmforgeError(f"{run_dir / 'metrics.jsonl'} is missing or empty; pass a run directory written by `lmforge train`")
    from matplotlib.figure import Figure  # a bare Figure renders to files without touching pyplot's global state

    curves = loss_curves(records)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name, style in (("train", "-"), ("val", "o-")):
        steps, losses = curves[name]
        if steps:
            ax.plot(steps, losses, style, label=f"{name} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # the temporary name has no .png: say the format
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=100, bbox_inches="tight")
    return out
