"""Bench output: terminal table, JSON, Markdown and a PNG bar chart, with the environment."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch

BASELINE = "hf"


def environment() -> dict:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": version("transformers"), "transformer_engine": _te_version(),
           "liger_kernel": version("liger_kernel") or version("liger-kernel"), "torchao": version("torchao")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - informative only
            env["driver"] = None
    return env


def _te_version() -> str | None:
    try:
        import transformer_engine

        return transformer_engine.__version__
    except Exception:  # noqa: BLE001
        return None


def speedups(results: list[dict]) -> dict[str, float]:
    base = next((r["median_ms"] for r in results if r["variant"] == BASELINE and r["status"] == "ok"), None)
    return {r["variant"]: base / r["median_ms"] for r in results if base and r["status"] == "ok"}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: dict, markdown: bool = False) -> str:
    s = report["settings"]
    head = ["variant", "ms/step (median)", "p10-p90", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "reserved GiB",
            "final loss", "last-pass loss",
            f"speedup vs {BASELINE}", "finetune options"]
    rows = []
    ups = speedups(report["results"])
    for r in report["results"]:
        if r["status"] != "ok":
            rows.append([r["variant"], f"{r['status']}: {r['reason']}"] + [""] * (len(head) - 2))
            continue
        rows.append([r["variant"], _fmt(r["median_ms"], ".1f"), f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
                     _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["tflops"], ".1f"),
                     _fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
                     _fmt(r["peak_mem_gib"], ".1f"), _fmt(r.get("peak_reserved_gib"), ".1f"),
                     _fmt(r["final_loss"], ".3f"), _fmt(r.get("last_pass_loss"), ".3f"),
                     f"{ups[r['variant']]:.2f}x" if r["variant"] in ups else "-", r.get("options") or "-"])
    title = f"{s['preset']}, batch {s['batch']} x {s['seq']} tokens, {s['steps']} timed steps after {s['warmup']}"
    if s.get("data", "random") != "random":
        title += f", {s['data']} data"
    if s.get("lr", 1e-5) != 1e-5:
        title += f", lr {s['lr']:g}"
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n"


def plot_chart(report: dict, path: Path) -> Path | None:
    ok = [r for r in report["results"] if r["status"] == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = speedups(report["results"])
    fig, ax = plt.subplots(figsize=(1.4 * len(ok) + 2, 4))
    bars = ax.bar([r["variant"] for r in ok], [r["median_ms"] for r in ok],
                  color=["tab:green" if r["variant"].startswith("te-") else "tab:gray" for r in ok])
    for bar, r in zip(bars, ok):
        label = f"{r['median_ms']:.0f} ms" + (f"\n{ups[r['variant']]:.2f}x" if r["variant"] in ups else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    s = report["settings"]
    gpu = report["environment"].get("gpu", "CPU")
    ax.set(ylabel="ms per training step (median)", title=f"{s['preset']}, {s['batch']} x {s['seq']} tokens, {gpu}")
    ax.margins(y=0.2)
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    stem = f"bench-{s['preset']}-b{s['batch']}-s{s['seq']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    env = ", ".join(f"{k} {v}" for k, v in report["environment"].items() if v)
    (out_dir / f"{stem}.md").write_text(render_table(report, markdown=True) + f"\nEnvironment: {env}\n")
    plot_chart(report, out_dir / f"{stem}.png")
