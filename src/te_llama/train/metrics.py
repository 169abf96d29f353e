"""Run metrics: JSON lines (always), TensorBoard (when installed), a PNG plot at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, tensorboard: bool = True) -> None:
        self.path = output_dir / "metrics.jsonl"
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(output_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                logger.info("TensorBoard not installed; metrics go to %s only", self.path)

    def log(self, kind: str, step: int, **values: Any) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss (train and eval) and useful tokens/s per step, as a PNG."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    speed_ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    speed_ax.set(xlabel="step", ylabel="useful tokens/s", title="throughput (non-pad tokens)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
