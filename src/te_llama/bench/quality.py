"""`te-llama bench --quality`: finetune configurations judged on a real finetune of a pretrained model.

Real text every machine has: the Python sources of installed packages. A small Llama (random init,
its own byte-level BPE) is pretrained with te-llama's own `finetune()` on one package's sources,
then finetuned once per variant and seed on another package's sources, with a held-out eval split;
the harder case pretrains the random model from scratch in each variant. A variant qualifies when
its mean finetune eval loss is within 1% of the base row's; a LoRA row (te-llama's LoRA on a BF16 or an
FP8 base) when within 1% of transformers + PEFT LoRA's, at the same rank, targets, steps and learning rate.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from ..train.config import GROUPS, FinetuneConfig
from .report import environment
from .variants import Variant, unavailable_reason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualitySize:
    pretrain_package: str
    finetune_package: str
    pretrain_rows: int
    finetune_rows: int
    chunk_chars: int
    """Rows are cut a bit longer than max_seq_len tokens: every row fills it, packed or padded."""
    vocab: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    scratch_steps: int
    pretrain_lr: float
    finetune_lr: float
    eval_every: int
    lora_lr: float
    """Every LoRA row's learning rate: adapters starting at zero want a higher one than a full finetune."""


SIZES = {
    "tiny": QualitySize("transformers", "torch", 160, 100, 500, 512, 2, 64, 4, 2, 176, 128, 4, 30, 12, 20, 3e-3, 1e-3,
                        4, 1e-2),
    "small": QualitySize("transformers", "torch", 8000, 3300, 5000, 8192, 12, 1024, 16, 4, 2816, 1024, 16, 500, 150,
                         300, 1e-3, 1e-4, 30, 1e-3),
}
EVAL_FRACTION = 0.1
QUALIFY_TOLERANCE = 0.01
BASE, HF = "bf16", "hf"
LORA_BASE, HF_LORA = "lora-bf16", "hf-lora"
CLIP, NO_CLIP = {"max_grad_norm": 1.0}, {"max_grad_norm": 0.0}
LORA = {"lora_rank": 16} | CLIP
"""Every LoRA row: rank 16 (alpha 32), every decoder linear, clipped at 1.0 (the Trainer's default)."""
CPU_BASE = {"backend": "reference", "precision": "fp32"}
"""Without a GPU the base rows (bf16, lora-bf16) run the fp32 reference backend: stand-ins for BF16, said so
in the report."""
_TE = ("cuda", "te")
QUALITY_VARIANTS = {v.name: v for v in [
    Variant(BASE, "the reference: BF16, gradients clipped at 1.0 (the usual finetune recipe); CPU: fp32 reference "
            "backend", {"precision": "bf16"} | CLIP),
    Variant("bf16-noclip", "BF16 without gradient clipping (what lets AdamW overlap backward)",
            {"precision": "bf16"} | NO_CLIP),
    *(Variant(p, f"--backend te --precision {p} at the run's --max-grad-norm (default 0: te-llama's fast path)",
              {"backend": "te", "precision": p}, None, _TE)
      for p in ("fp8-block", "fp8-delayed", "fp8-current", "fp8-delayed-fastacc", "fp8-current-fastacc")),
    Variant(HF, "transformers as is: --backend hf --no-packing, clipped at 1.0 (the Trainer's default)",
            {"backend": "hf", "packing": False} | CLIP),
    Variant(LORA_BASE, "te-llama LoRA (--lora-rank 16) on a frozen BF16 base; CPU: fp32 reference backend",
            {"precision": "bf16"} | LORA),
    Variant("lora-fp8", "te-llama LoRA on a frozen FP8 base: --lora-rank 16 --lora-base fp8", {"backend": "te",
            "lora_base": "fp8"} | LORA, None, _TE),
    Variant(HF_LORA, "transformers + PEFT LoRA, same rank and targets: --backend hf --no-packing --lora-rank 16",
            {"backend": "hf", "packing": False} | LORA, None, ("peft",)),
]}
REFERENCE = {LORA_BASE: HF_LORA, "lora-fp8": HF_LORA, HF_LORA: HF_LORA}
"""The row a variant's verdict compares with (the others': BASE): LoRA rows with transformers + PEFT."""
CPU_STAND_INS = (BASE, LORA_BASE)
CASES = ("finetune", "scratch")
DEFAULT_QUALITY_VARIANTS = tuple(QUALITY_VARIANTS)


def package_rows(package: str, limit: int, chunk_chars: int, per_file: int = 8) -> list[str]:
    """Up to `limit` text rows of ~chunk_chars from a package's .py files: sorted paths, visited with a
    stride so the rows span the whole package, at most `per_file` rows per file (line boundaries kept),
    no row twice (a duplicate would put eval rows in the training split)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: its sources are the quality bench's text")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py"))
    stride = max(1, len(files) * per_file // max(limit, 1) // 2)
    rows: list[str] = []
    seen: set[str] = set()
    for path in (files[i] for start in range(stride) for i in range(start, len(files), stride)):
        chunk, taken = "", 0
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            chunk += line
            if len(chunk) < chunk_chars:
                continue
            if chunk not in seen:  # license headers repeat: no duplicates
                rows.append(chunk)
                seen.add(chunk)
                taken += 1
            chunk = ""
            if taken == per_file or len(rows) == limit:
                break
        if len(rows) == limit:
            break
    return rows


def write_jsonl(rows: list[str], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return str(path)


def build_model(size: QualitySize, rows: list[str], folder: Path, seed: int = 0) -> Path:
    """A random-init Llama and a byte-level BPE trained on `rows`, saved as an HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size.vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(rows[::max(1, len(rows) // 2000)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=size.seq,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def variant_options(variant: Variant, options: dict[str, Any]) -> dict[str, Any]:
    """The variant's finetune options over the passed-through ones (speed options: te-llama rows only)."""
    if variant.name in CPU_STAND_INS and not torch.cuda.is_available():
        return options | variant.config | CPU_BASE
    if not variant.ours:
        options = {k: v for k, v in options.items() if k not in GROUPS["speed"]}
    return options | variant.config


def train_run(variant: Variant, out: Path, common: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """One finetune() run as a report row; what cannot run here is skipped with the reason."""
    from ..train.recipe import finetune

    config = variant_options(variant, options)
    row = {"variant": variant.name, "seed": common["seed"], "config": config, "status": "ok", "reason": None,
           "eval_loss": None, "final_loss": None, "output_dir": str(out)}
    reason = unavailable_reason(variant, options)
    if reason:
        return row | {"status": "skipped", "reason": reason}
    try:
        result = finetune(FinetuneConfig(**(common | config), output_dir=str(out)))
        row |= {"eval_loss": result.eval_loss, "final_loss": result.final_loss}
    except Exception as exc:  # one failing variant is a row, not the end of the bench
        logger.exception("%s failed", variant.name)
        row |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:400]}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per seed: eval loss over the base row's and over hf's; per variant: mean, spread, verdict."""
    def ref(name: str, seed: int) -> float | None:
        return next((r["eval_loss"] for r in rows if r["variant"] == name and r["seed"] == seed), None)

    for row in rows:
        for key, name in (("ratio_base", BASE), ("ratio_hf", HF)):
            other = ref(name, row["seed"])
            row[key] = row["eval_loss"] / other if row["eval_loss"] is not None and other else None
    def losses_of(name: str) -> list[float]:
        return [r["eval_loss"] for r in rows if r["variant"] == name and r["eval_loss"] is not None]

    summary = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        losses, base, hf = losses_of(name), losses_of(BASE), losses_of(HF)
        reference = REFERENCE.get(name, BASE)
        m, judge = (mean(losses) if losses else None), losses_of(reference)
        ratio = m / mean(judge) if m is not None and judge else None
        summary.append({"variant": name, "mean_eval_loss": m, "spread": max(losses) - min(losses) if losses else None,
                        "ratio_base": m / mean(base) if m is not None and base else None,
                        "ratio_hf": m / mean(hf) if m is not None and hf else None, "reference": reference,
                        "ratio_reference": ratio,
                        "qualifies": None if ratio is None else abs(ratio - 1) <= QUALIFY_TOLERANCE,
                        "reason": next((r["reason"] for r in rows if r["variant"] == name and r["reason"]), None)})
    return summary


def run_quality(size_name: str, variants: list[str], seeds: list[int], out_dir: str | Path,
                options: dict[str, Any] | None = None, cache_dir: str | None = None,
                cases: tuple[str, ...] = CASES, progress=print) -> dict:
    """Pretrain, then per seed and variant: finetune, and pretrain from scratch. The reports are
    rewritten after every row, so a run cut short still leaves its finished rows."""
    unknown = [n for n in variants if n not in QUALITY_VARIANTS]
    if unknown:
        raise ValueError(f"unknown quality variant(s) {unknown}; choose from {list(QUALITY_VARIANTS)}")
    if not cases or set(cases) - set(CASES):
        raise ValueError(f"quality cases {list(cases)}: choose one or more of {list(CASES)}")
    size, out, options, cases = SIZES[size_name], Path(out_dir), options or {}, tuple(dict.fromkeys(cases))
    chosen = [QUALITY_VARIANTS[n] for n in dict.fromkeys([BASE, *variants])]  # the base row always runs
    pre_rows = package_rows(size.pretrain_package, size.pretrain_rows, size.chunk_chars)
    fine_rows = package_rows(size.finetune_package, size.finetune_rows, size.chunk_chars)
    pre_data, fine_data = write_jsonl(pre_rows, out / "data/pretrain.jsonl"), write_jsonl(fine_rows, out / "data/finetune.jsonl")
    model = build_model(size, pre_rows, out / "init")
    common = {"max_seq_len": size.seq, "batch_size": size.batch, "save_every": 0, "tensorboard": False,
              "overwrite": True, "eval_every": size.eval_every, "cache_dir": cache_dir or str(out / "cache"),
              "warmup_ratio": 0.05}
    gpu = torch.cuda.is_available()
    report = {"size": size_name, "sizes": asdict(size), "seeds": seeds, "options": options, "cases": list(cases),
              "environment": environment(), "device": "cuda" if gpu else "cpu", "pretrain": None,
              "notes": [] if gpu else ["no GPU: the base 'bf16' row is the fp32 reference backend (a stand-in)"],
              "finetune": [], "scratch": [], "summary": [], "scratch_summary": []}
    if "finetune" in cases:
        report["pretrain"] = pretrain(size, common, model, pre_data, out, len(pre_rows), len(fine_rows), gpu, progress)
    for seed in seeds:
        for case in cases:
            for variant in chosen:
                lora = "lora_rank" in variant.config
                if case == "scratch" and lora:
                    continue  # adapters on a random model: nothing a LoRA finetune is for
                if case == "finetune":
                    run = {"model": str(out / "pretrain" / "final"), "data": fine_data,
                           "max_steps": size.finetune_steps, "learning_rate": size.lora_lr if lora else size.finetune_lr}
                else:
                    run = {"model": str(model), "data": pre_data, "max_steps": size.scratch_steps,
                           "learning_rate": size.pretrain_lr}
                row = train_run(variant, out / case / f"{variant.name}-seed{seed}",
                                common | run | {"seed": seed, "eval_fraction": EVAL_FRACTION}, options)
                report[case].append(row)
                progress(f"{case} {variant.name} seed {seed}: {row['status']} "
                         f"{row['eval_loss'] if row['eval_loss'] is not None else row['reason']}")
                report["summary"], report["scratch_summary"] = add_ratios(report["finetune"]), add_ratios(report["scratch"])
                write_quality_reports(report, out)
    return report


def pretrain(size: QualitySize, common: dict[str, Any], model: Path, data: str, out: Path, rows: int,
             finetune_rows: int, gpu: bool, progress) -> dict[str, Any]:
    """The finetune case's starting point: the random model pretrained in BF16 (fp32 on CPU)."""
    from ..train.metrics import read_metrics

    progress(f"pretraining a {size.layers}-layer, hidden-{size.hidden} Llama on {rows} rows of "
             f"{size.pretrain_package}'s sources, {size.pretrain_steps} steps")
    config = ({"precision": "bf16"} if gpu else {"precision": "fp32"}) | CLIP
    row = train_run(Variant("pretrain", "", config), out / "pretrain",
                    common | {"model": str(model), "data": data, "max_steps": size.pretrain_steps, "seed": 0,
                              "learning_rate": size.pretrain_lr, "eval_fraction": 0.0}, {})
    if row["status"] != "ok":
        raise RuntimeError(f"pretraining failed: {row['reason']}")
    losses = [r["loss"] for r in read_metrics(out / "pretrain/metrics.jsonl") if r["kind"] == "train"]
    return {"steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1], "rows": rows,
            "finetune_rows": finetune_rows}


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def render_quality(report: dict) -> str:
    pre = report["pretrain"]
    lines = [f"## Quality ({report['size']}, device {report['device']}"
             + (f", pretrain loss {pre['first_loss']:.3f} -> {pre['final_loss']:.3f})" if pre else ")"),
             *report["notes"], "", "| case | variant | seed | status | eval loss | / base | / hf |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {case} | {r['variant']} | {r['seed']} | {r['status']} | {_fmt(r['eval_loss'])} | "
              f"{_fmt(r['ratio_base'])} | {_fmt(r['ratio_hf'])} |" for case in CASES for r in report[case]]
    for title, key in (("Finetune, over seeds", "summary"), ("From scratch, over seeds (eval on held-out "
                                                              "pretraining rows)", "scratch_summary")):
        if not report[key]:
            continue
        lines += ["", f"### {title}", "", "| variant | mean eval loss | spread | / base | / hf | judged against | "
                  "verdict |", "|---|---|---|---|---|---|---|"]
        for s in report[key]:
            verdict = (f"not run: {s['reason']}" if s["reason"] else "-") if s["qualifies"] is None else \
                ("qualifies" if s["qualifies"] else f"does not qualify (> {QUALIFY_TOLERANCE:.0%} off {s['reference']})")
            lines.append(f"| {s['variant']} | {_fmt(s['mean_eval_loss'])} | {_fmt(s['spread'])} | "
                         f"{_fmt(s['ratio_base'])} | {_fmt(s['ratio_hf'])} | {s['reference']} "
                         f"({_fmt(s['ratio_reference'])}) | {verdict} |")
    return "\n".join(lines) + "\n"


def write_quality_reports(report: dict, out: Path) -> None:
    """quality.json, quality.md and quality.png (train and eval loss per variant, finetune and scratch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics import read_metrics

    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text(render_quality(report))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in ((axes[0], "finetune", "finetune (first seed)"), (axes[1], "scratch", "from scratch")):
        for row in (r for r in report[key] if r["status"] == "ok" and r["seed"] == report["seeds"][0]):
            metrics = read_metrics(Path(row["output_dir"]) / "metrics.jsonl")
            train = [(m["step"], m["loss"]) for m in metrics if m["kind"] == "train"]
            evals = [(m["step"], m["loss"]) for m in metrics if m["kind"] == "eval"]
            line, = ax.plot(*zip(*train), alpha=0.4, label=f"{row['variant']} train")
            if evals:
                ax.plot(*zip(*evals), "o-", color=line.get_color(), label=f"{row['variant']} eval")
        ax.set(xlabel="step", ylabel="loss", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=100)
    plt.close(fig)
