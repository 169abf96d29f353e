"""Command line: `te-llama <subcommand>`; each subcommand maps to one typed function."""

from __future__ import annotations

import argparse
import ast
import errno
import inspect
import math
import sys
import textwrap
from dataclasses import fields
from typing import Literal, get_args, get_origin, get_type_hints

import torch

from .errors import TeLlamaError
from .train.config import GROUPS, FinetuneConfig
from .train.faults import TrainingInterrupted


def _check(args: argparse.Namespace) -> int:
    from .check import DEFAULT_PRESETS, check_preset

    device = args.device or ("cuda" if args.backend == "te" else "cpu")
    dtype = getattr(torch, args.dtype)
    print(f"{'preset':<12} {'family':<8} {'backend':<9} {'qkv':<8} {'logits err':>11} {'grads err':>10}  export")
    ok = True
    for preset in args.preset or DEFAULT_PRESETS:
        for fuse in (False, True):
            r = check_preset(preset, args.backend, fuse, device, dtype)
            passed = r.export_bit_identical and r.logits_max_rel_error <= args.tolerance
            ok &= passed
            print(f"{r.preset:<12} {r.model_type:<8} {r.backend:<9} {'fused' if fuse else 'separate':<8} "
                  f"{r.logits_max_rel_error:>11.2e} {r.grads_max_rel_error:>10.2e}  "
                  f"{'bit-identical' if r.export_bit_identical else 'DIFFERS'}")
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1


def _finetune(args: argparse.Namespace) -> int:
    import logging

    from .train.config import resolve_config
    from .train.recipe import finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    result = finetune(resolve_config(args.config, **flags))
    eval_part = (f", eval loss {result.eval_loss:.4f} (ppl {math.exp(min(result.eval_loss, 50)):.2f})"
                 if result.eval_loss is not None else "")
    adapter = result.exported is not None and (result.exported / "adapter_config.json").is_file()
    merged = result.output_dir / "final-merged"
    where = (f"{'PEFT adapter' if adapter else 'HF model'} exported to {result.exported}"
             + (f", merged model to {merged}" if adapter and merged.is_dir() else "")) if result.exported else \
        f"checkpoint in {result.output_dir}"
    print(f"done: {result.steps} steps, final train loss {result.final_loss:.4f}{eval_part}, "
          f"{result.useful_tokens_per_s:,.0f} useful tokens/s; {where}; "
          f"metrics {result.output_dir / 'metrics.jsonl'}, plot {result.output_dir / 'metrics.png'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, run_bench
    from .bench.report import render_table
    from .bench.variants import DEFAULT_VARIANTS, VARIANTS

    if args.quality:
        return _bench_quality(args)
    if args.list:
        for variant in VARIANTS.values():
            print(f"{variant.name:<16} {variant.description}" if args.verbose else variant.name)
        return 0
    options = {name: getattr(args, name) for name in BENCH_OPTION_GROUPS_FIELDS if getattr(args, name) is not None}
    FinetuneConfig(**options)  # typed and range-checked like finetune's, before any variant runs
    settings = BenchSettings(preset=args.preset, batch=args.batch, seq=args.seq, steps=args.steps,
                             warmup=args.warmup, seed=args.seed, sync_each_step=args.sync_each_step,
                             data=args.data, lr=args.lr, options=options)
    report = run_bench(args.variants or list(DEFAULT_VARIANTS), settings, args.out, timeout_s=args.timeout)
    print(render_table(report))
    if args.out:
        print(f"reports (JSON, Markdown, PNG) in {args.out}")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


def _bench_quality(args: argparse.Namespace) -> int:
    import logging

    from .bench.quality import QUALITY_VARIANTS, render_quality, run_quality

    if args.list:
        for variant in QUALITY_VARIANTS.values():
            print(f"{variant.name:<20} {variant.description}" if args.verbose else variant.name)
        return 0
    if not args.out:
        raise ValueError("bench --quality needs --out DIR (data, models, runs and reports are written there)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    options = {name: getattr(args, name) for name in BENCH_OPTION_GROUPS_FIELDS if getattr(args, name) is not None}
    FinetuneConfig(**options)
    report = run_quality(args.quality_size, args.variants or list(QUALITY_VARIANTS), args.seeds, args.out, options,
                         cases=tuple(args.quality_cases))
    print(render_quality(report))
    for case, key in (("finetune", "summary"), ("from scratch", "scratch_summary")):
        for row in report[key]:
            verdict = f"not run ({row['reason']})" if row["qualifies"] is None else \
                "qualifies" if row["qualifies"] else "does NOT qualify"
            print(f"{case} {row['variant']}: {verdict} (qualifies = mean eval loss within 1% of "
                  f"{row['reference']}'s)")
    print(f"reports (quality.json, quality.md, quality.png) in {args.out}")
    base_rows = [s[0] for s in (report["summary"], report["scratch_summary"]) if s]
    return 0 if base_rows and all(row["mean_eval_loss"] is not None for row in base_rows) else 1


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (kept in the source, not at run time)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _add_config_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...] = tuple(GROUPS),
                      exclude: tuple[str, ...] = ()) -> None:
    """One flag per FinetuneConfig field of `groups` (--max-seq-len ...), in --help sections; unset flags stay None."""
    hints, docs = get_type_hints(FinetuneConfig), field_docs(FinetuneConfig)
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    for group in groups:
        section = parser.add_argument_group(f"{group} options")
        for name in (n for n in GROUPS[group] if n not in exclude):
            flag, kind = "--" + name.replace("_", "-"), hints[name]
            default = "auto" if defaults[name] is None and bool in get_args(kind) else defaults[name]
            help_text = f"{docs.get(name, '')} (default: {default})".replace("%", "%%")
            listed = next((a for a in get_args(kind) if get_origin(a) is list), None)
            if kind is bool or bool in get_args(kind):  # bool | None: unset means auto
                section.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif listed is not None:  # list[Literal[...]] | None: names separated by spaces
                section.add_argument(flag, nargs="+", choices=get_args(get_args(listed)[0]), default=None,
                                     metavar="NAME", help=help_text)
            elif get_origin(kind) is Literal:
                section.add_argument(flag, choices=get_args(kind), default=None, help=help_text)
            else:  # a number; int | Literal["auto"]: a number or the name, checked by FinetuneConfig
                named = next((a for a in get_args(kind) if get_origin(a) is Literal), None)
                base = str if named is not None else \
                    next((t for t in (int, float, str) if t == kind or t in get_args(kind)), str)
                section.add_argument(flag, type=base, default=None, metavar=name.upper(), help=help_text)


BENCH_OPTION_GROUPS = ("optimization", "speed", "lora")
BENCH_SETS = ("batch_size", "max_steps", "epochs", "stop_after_steps", "seed", "learning_rate", "grad_accum",
              "parallel", "lora_adapter", "merge_lora")
"""Finetune options the bench does not pass through: its own flags set them (--batch, --steps, --seed,
--lr), it times one process and one micro-batch per step, and it exports nothing."""
BENCH_OPTION_GROUPS_FIELDS = [name for group in BENCH_OPTION_GROUPS for name in GROUPS[group] if name not in BENCH_SETS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="te-llama", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="convert built-in tiny models and compare with HF")
    check.add_argument("--preset", nargs="+", default=None,
                       help="presets to check (default: one tiny model per supported family)")
    check.add_argument("--backend", choices=["reference", "te"], default="reference")
    check.add_argument("--device", default=None)
    check.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    check.add_argument("--tolerance", type=float, default=1e-5, help="max relative logits error")
    check.set_defaults(func=_check)
    tune = sub.add_parser("finetune", help="finetune an HF checkpoint (default: the tiny built-in model)",
                          description="Flags override --config (YAML or TOML). Without --model, the embedded default (tiny built-in model, bundled data) sets shorter runs: see BUILTIN_DEFAULTS in te_llama/train/config.py; examples/finetune.yaml lists every option by group.")
    tune.add_argument("--config", default=None, help="YAML or TOML file with FinetuneConfig options")
    _add_config_flags(tune)
    tune.set_defaults(func=_finetune)

    from .bench.variants import DEFAULT_VARIANTS

    bench = sub.add_parser("bench", help="training step time of te-llama's finetune configurations vs transformers, "
                           "torch.compile, Liger, torchao", description="Each te-llama row is a finetune configuration: "
                           "the optimization, speed and lora options below apply to every te-llama row (optimization "
                           "and lora options but --lora-base to the peers too: --lora-rank 16 makes every row LoRA).")
    bench.add_argument("--list", action="store_true", help="print the variant names and exit (-v: with descriptions)")
    bench.add_argument("-v", "--verbose", action="store_true", help="with --list: describe each variant")
    bench.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                       help=f"rows to run (default: {' '.join(DEFAULT_VARIANTS)}; with --quality: every quality "
                       "variant, --list --quality prints them)")
    bench.add_argument("--quality", action="store_true",
                       help="judge variants on loss instead of speed: pretrain a small Llama on one installed "
                       "package's Python sources, finetune it per variant and seed on another's, compare held-out "
                       "eval loss (and from scratch); a variant qualifies within 1%% of the base (bf16) row")
    bench.add_argument("--quality-size", choices=["tiny", "small"], default="small",
                       help="with --quality: tiny (2 layers, hidden 64, seconds on a CPU) or small (12 layers, "
                       "hidden 1024, GPU)")
    bench.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="with --quality: finetune seeds")
    bench.add_argument("--quality-cases", nargs="+", choices=["finetune", "scratch"], default=["finetune", "scratch"],
                       help="with --quality: finetune a pretrained model, train from scratch, or both (default)")
    bench.add_argument("--preset", default="llama2-7b", help="model shape: a preset name (random weights)")
    bench.add_argument("--batch", type=int, default=8, help="rows (documents) per step")
    bench.add_argument("--seq", type=int, default=256, help="tokens per row")
    bench.add_argument("--steps", type=int, default=10, help="timed steps")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default=None, help="folder for JSON, Markdown and PNG reports")
    bench.add_argument("--sync-each-step", action=argparse.BooleanOptionalAction, default=True,
                       help="read the loss after every step, as finetune does (default), or queue steps back to back")
    bench.add_argument("--data", choices=["random", "sample"], default="random",
                       help="token rows: seeded random ids, or the bundled sample text (loss-curve check)")
    bench.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate, every variant")
    bench.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    _add_config_flags(bench, BENCH_OPTION_GROUPS, exclude=BENCH_SETS)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Errors a user can act on print one message, no traceback: exit 2; a signal: 128 + its number."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"te-llama: {exc}", file=sys.stderr)
        return exc.exit_code
    except (TeLlamaError, FileNotFoundError, ValueError) as exc:
        print(f"te-llama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("te-llama: interrupted (checkpoints and exports are written atomically: none is half-written)",
              file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or "the output folder"
        print(f"te-llama: error: the disk is full (or over quota) writing {where}; free space or choose "
              "another --output-dir / --cache-dir", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
