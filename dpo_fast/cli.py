"""The ``dpo-fast`` command line (also ``python -m dpo_fast``).

Each subcommand lives in its own module and is registered in :data:`SUBCOMMANDS` as
``name -> "module:function"``; the function receives the argparse subparsers object and
adds its parser with ``set_defaults(func=...)``. Subcommand modules keep heavy imports
(transformers, triton, matplotlib) inside their functions so that parsing stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": "dpo_fast.demo:register",
    "verify": "dpo_fast.trainer:register_verify",
    "example": "dpo_fast.example:register",
    "precompute": "dpo_fast.precompute:register_precompute",
    "cache": "dpo_fast.precompute:register_cache",
    "bench": "dpo_fast.bench:register",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-fast", description="Fused kernels for the hot path of DPO training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for target in SUBCOMMANDS.values():
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
