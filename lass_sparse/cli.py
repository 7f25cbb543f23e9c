"""The ``lass-sparse`` command line.

Subcommands come from modules that expose ``add_commands(subparsers)``; each parser sets
``func(args) -> int | None``. A module that fails to import (a missing optional dependency)
is reported by ``lass-sparse --help`` rather than breaking the CLI.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "lass_sparse.lass.commands",
    "lass_sparse.lass.reproduce",
    "lass_sparse.lass.recipe",
    "lass_sparse.hf.commands",
    "lass_sparse.lass.corpus",
    "lass_sparse.showcase",
)


def _cmd_backends(args: argparse.Namespace) -> int:
    import lass_sparse

    table = lass_sparse.backends()
    width = max(len(n) for n in table)
    print(f"{'backend':<{width}}  active  reason")
    for name, row in table.items():
        print(f"{name:<{width}}  {'yes' if row['active'] else 'no':<6}  {row['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lass-sparse",
        description="LaSS (language-specific sub-networks) with 1-bit packed masks fused into "
        "PyTorch kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("backends", help="show which kernel backends are active and why not")
    p.set_defaults(func=_cmd_backends)
    broken = []
    for mod in COMMAND_MODULES:
        if importlib.util.find_spec(mod) is None:  # not in this version
            continue
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            broken.append(f"{mod}: {e}")
            continue
        module.add_commands(sub)
    if broken:
        parser.epilog = "unavailable command groups: " + "; ".join(broken)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
