"""The ``lass-sparse`` command line.

Subcommands come from modules that expose ``add_commands(subparsers)``; each parser sets
``func(args) -> int | None``. A module that fails to import (a missing optional dependency)
is reported by ``lass-sparse --help`` rather than breaking the CLI.

Errors: a user error (a bad argument, a missing or corrupt file, a missing optional package)
prints one line ``lass-sparse: error: ...`` on stderr and exits non-zero (2: a bad command line
or a missing package; 1: anything else); ``--debug`` (anywhere on the command line, or
``LASS_SPARSE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import traceback

# Commands that run under torchrun (one process per rank); every other command refuses there.
DISTRIBUTED_COMMANDS = ("train", "finetune", "joint", "extend", "experiment")


def env_world_size() -> int:
    """Processes torchrun started for this job (``$WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_torchrun(command: str | None) -> None:
    """Refuse a one-process command started by torchrun (its ranks would write the same files)."""
    if env_world_size() > 1 and command not in DISTRIBUTED_COMMANDS:
        raise CommandError(f"`{command}` runs in one process: start it without torchrun "
                           f"(torchrun is for {', '.join(DISTRIBUTED_COMMANDS)})")


# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "lass_sparse.lass.commands",
    "lass_sparse.lass.experiment.commands",
    "lass_sparse.hf.commands",
    "lass_sparse.mt.corpus_build",
    "lass_sparse.showcase",
    "lass_sparse.serve.commands",
)


def _cmd_backends(args: argparse.Namespace) -> int:
    import lass_sparse

    table = lass_sparse.backends()
    width = max(len(n) for n in table)
    print(f"{'backend':<{width}}  active  reason")
    for name, row in table.items():
        print(f"{name:<{width}}  {'yes' if row['active'] else 'no':<6}  {row['reason']}")
    return 0


PROG = "lass-sparse"

# optional packages -> the extra that installs them (pyproject.toml)
EXTRAS = {"sentencepiece": "lass", "sacrebleu": "lass", "langid": "lass", "matplotlib": "lass",
          "triton": "triton", "cupy": "cupy"}


class CommandError(ValueError):
    """A user error with a complete one-line message (what, which file/argument, what to do)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def missing_package(name: str, what: str = "this command") -> CommandError:
    """The one-line error for an optional package that is not installed."""
    root = name.split(".")[0]
    extra = EXTRAS.get(root)
    how = f'pip install "lass_sparse[{extra}]"' if extra else f"pip install {root}"
    return CommandError(f"{what} needs the Python package {root!r}, which is not installed: "
                        f"{how}", code=2)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``lass-sparse: error: ...``); subcommand parsers inherit
    it."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog.removeprefix(PROG).strip()
        hint = f"see `{self.prog} --help`"
        self.exit(2, f"{PROG}: error: {where + ': ' if where else ''}{message} ({hint})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="LaSS (language-specific sub-networks) with 1-bit packed masks fused into "
        "PyTorch kernels.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also accepted after the command)")
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _file_in_traceback(tb) -> str | None:
    """The innermost file path a lass_sparse frame was reading when the error happened (errors
    such as gzip's "Not a gzipped file" do not say which file)."""
    found = None
    for frame, _ in traceback.walk_tb(tb):
        if "lass_sparse" not in frame.f_code.co_filename:
            continue
        for name in ("path", "filename", "file", "fname"):
            v = frame.f_locals.get(name)
            if isinstance(v, str) and os.path.isfile(v):
                found = v
                break
    return found


def describe_error(e: BaseException) -> str:
    """One line saying what went wrong (and, where the exception does not, which file)."""
    if isinstance(e, CommandError):
        return _one_line(e)
    if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
        msg = e.args[0]  # str(KeyError) adds quotes
    elif isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    elif isinstance(e, UnicodeDecodeError):
        msg = f"not valid UTF-8 text ({e.reason} at byte {e.start})"
    else:
        msg = str(e) or type(e).__name__
    msg = _one_line(msg)
    path = _file_in_traceback(e.__traceback__)
    if path and path not in msg and os.path.basename(path) not in msg:
        msg += f" (reading {path})"
    user = (ValueError, OSError, KeyError, EOFError, NotImplementedError, RuntimeError)
    if not isinstance(e, user) and type(e).__name__ not in ("SafetensorError", "LZMAError",
                                                             "error"):
        msg = (f"internal error: {type(e).__name__}: {msg} (rerun with --debug for the "
               "traceback, and please report it)")
    return msg


# ------------------------------------------------------------- argument types (every command)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") \
                from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {'positive' if lo == 1 else f'>= {lo}'}, "
                                             f"got {text}")
        return v

    parse.__name__ = "positive int" if lo == 1 else f"int >= {lo}"
    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def _float_in(lo: float, hi: float | None, *, lo_open: bool = False, hi_open: bool = True):
    where = (f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if hi is not None
             else f"{'>' if lo_open else '>='} {lo:g}")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {where}, got {text!r}") \
                from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
            hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {where}, got {text}")
        return v

    parse.__name__ = f"number in {where}"
    return parse


fraction = _float_in(0.0, 1.0)  # alpha, dropout: [0, 1)
positive_float = _float_in(0.0, None, lo_open=True)
nonneg_float = _float_in(0.0, None)


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


NPROC_OPTION = "--nproc-per-node"


def add_nproc_option(p: argparse.ArgumentParser) -> None:
    """``--nproc-per-node N``: run the command as N ranks of one job (DDP / spread work)."""
    p.add_argument(NPROC_OPTION, type=positive_int, default=1, metavar="N",
                   help="start N processes of this command as one job (torch.distributed.run, "
                   "one node; gloo on CPUs, NCCL on GPUs); the same as `torchrun "
                   "--nproc-per-node N -m lass_sparse.cli -- ...`")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == NPROC_OPTION:
            skip = True
        elif not a.startswith(NPROC_OPTION + "="):
            out.append(a)
    return out


def _leave_process_group(ok: bool) -> None:
    """Destroy the process group a command joined (see runtime.leave_process_group); never
    raises over the command's own result."""
    if "torch.distributed" not in sys.modules:
        return
    from .lass.runtime import leave_process_group

    try:
        leave_process_group(ok)
    except Exception as e:  # a peer gone at the final barrier: the command's result stands
        print(f"{PROG}: warning: leaving the process group: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LASS_SPARSE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        check_torchrun(getattr(args, "command", None))
        args.argv = argv + (["--debug"] if debug else [])  # for a command that starts ranks
        nproc = getattr(args, "nproc_per_node", 1)
        if nproc > 1 and env_world_size() == 1:
            from .lass.runtime import launch

            return launch(nproc, _without_nproc(args.argv))
        code = int(args.func(args) or 0)
        _leave_process_group(code == 0)
        return code
    except SystemExit:
        _leave_process_group(False)
        raise
    except KeyboardInterrupt:
        _leave_process_group(False)
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        _leave_process_group(False)
        if debug:
            raise
        code = 1
        if isinstance(e, ModuleNotFoundError) and e.name:
            command = getattr(args, "command", None)
            e = missing_package(e.name, f"`{PROG} {command}`" if command else "this command")
        if isinstance(e, CommandError):
            code = e.code
        print(f"{PROG}: error: {describe_error(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
