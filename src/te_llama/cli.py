"""Command line: `te-llama <subcommand>`; each subcommand maps to one typed function."""

from __future__ import annotations

import argparse
import sys

import torch


def _check(args: argparse.Namespace) -> int:
    from .check import check_preset

    device = args.device or ("cuda" if args.backend == "te" else "cpu")
    dtype = getattr(torch, args.dtype)
    print(f"{'preset':<12} {'backend':<9} {'qkv':<8} {'logits err':>11} {'grads err':>10}  export")
    ok = True
    for preset in args.preset:
        for fuse in (False, True):
            r = check_preset(preset, args.backend, fuse, device, dtype)
            passed = r.export_bit_identical and r.logits_max_rel_error <= args.tolerance
            ok &= passed
            print(f"{r.preset:<12} {r.backend:<9} {'fused' if fuse else 'separate':<8} "
                  f"{r.logits_max_rel_error:>11.2e} {r.grads_max_rel_error:>10.2e}  "
                  f"{'bit-identical' if r.export_bit_identical else 'DIFFERS'}")
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="te-llama", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="convert built-in tiny models and compare with HF")
    check.add_argument("--preset", nargs="+", default=["tiny-llama", "tiny-qwen2"])
    check.add_argument("--backend", choices=["reference", "te"], default="reference")
    check.add_argument("--device", default=None)
    check.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    check.add_argument("--tolerance", type=float, default=1e-5, help="max relative logits error")
    check.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
