"""`te-llama bench`: training step time of te-llama against its peers, one process per variant."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .measure import BenchResult, BenchSettings
from .report import environment, write_reports
from .variants import DEFAULT_VARIANTS, VARIANTS, select, unavailable_reason

__all__ = ["BenchResult", "BenchSettings", "DEFAULT_VARIANTS", "VARIANTS", "run_bench"]


def _run_variant(name: str, settings: BenchSettings, timeout_s: float) -> BenchResult:
    """Measure in a fresh process, so no memory or compiled state carries over."""
    request = json.dumps({"variant": name, "settings": asdict(settings)})
    try:
        proc = subprocess.run([sys.executable, "-m", "te_llama.bench.measure", request],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return BenchResult(name, "failed", reason=f"timed out after {timeout_s:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = " | ".join(tail) or f"exit code {proc.returncode}"
        if "OutOfMemoryError" in proc.stderr or "CUDA out of memory" in proc.stderr:
            reason = "out of GPU memory"
        return BenchResult(name, "failed", reason=reason)
    return BenchResult(**json.loads(lines[-1]))


def run_bench(variants: list[str], settings: BenchSettings, out_dir: str | Path | None = None,
              timeout_s: float = 900, progress=print) -> dict:
    """Run each variant (skipping, with the reason, those that cannot run here); write reports."""
    results = []
    report = {"settings": asdict(settings), "environment": environment(), "results": []}
    for variant in select(variants):
        reason = unavailable_reason(variant, settings.options)
        result = BenchResult(variant.name, "skipped", reason=reason) if reason else \
            _run_variant(variant.name, settings, timeout_s)
        progress(f"{result.variant}: {result.status}"
                 + (f" {result.median_ms:.1f} ms/step" if result.median_ms else f" ({result.reason})"))
        results.append(result)
        report["results"] = [asdict(r) for r in results]
        if out_dir is not None:  # after every variant: a run cut short keeps what it measured
            write_reports(report, Path(out_dir))
    return report
