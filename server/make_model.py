"""`make-model`: write a small GGML GPT-J file (random, successor or the demo model), then inspect it."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from server.cli import inspect_file, non_negative_int

FTYPES = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
# option -> (default, help); None defaults are filled in after parsing, so `--kind demo` can tell
# which size options were given.
SIZES: dict[str, tuple[int, str]] = {
    "n_vocab": (512, "vocabulary size, >= 300 (256 byte tokens, common words, <|endoftext|>, fillers)"),
    "n_ctx": (256, "context length the file declares"),
    "n_embd": (64, "embedding width; a multiple of --n-head, and of 32 for the quantized ftypes"),
    "n_head": (4, "attention heads"),
    "n_layer": (2, "transformer layers"),
    "n_rot": (8, "rotary dimensions per head: even, at most --n-embd / --n-head"),
}
_FIELD = re.compile(r"\b(" + "|".join([*SIZES, "ftype"]) + r")\b")


def add_parser(sub) -> None:
    """The make-model subcommand and its options."""
    make = sub.add_parser("make-model", help="write a small GGML GPT-J model file",
                          description="Write a small GGML GPT-J model file (deterministic for the same options) "
                                      "and describe it. Meant for tests, demos and benchmarks.")
    make.add_argument("out", type=Path, help="the file to write; its folder must exist")
    for name, (default, text) in SIZES.items():
        make.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, metavar="N",
                          help=f"{text} (default {default})")
    make.add_argument("--ftype", choices=FTYPES, default="q4_0",
                      help="weight type of the 2-D tensors (default %(default)s)")
    make.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default %(default)s)")
    make.add_argument("--kind", choices=["random", "successor", "demo"], default="random",
                      help="random weights, a successor model (greedy next token = next vocab entry), "
                           "or the bundled demo model, whose sizes are fixed (default %(default)s)")
    make.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")


class UsageError(Exception):
    """Bad make-model input: printed as `error: ...`, exit status 2."""


def run(args: argparse.Namespace) -> int:
    """Write the file described by the parsed options; exit status."""
    from backends.ggml.writer import ConfigError

    try:
        write = _plan(args)  # every option is checked before the output path
        _check_output(args.out, args.force)
        write()
    except ConfigError as exc:  # raised by write() too: a successor model's margin
        print(f"error: {_FIELD.sub(lambda m: '--' + m.group(1).replace('_', '-'), str(exc))}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: not enough memory to build a model of this size; use smaller --n-vocab, --n-embd or "
              "--n-layer", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return inspect_file(args.out)


def _check_output(out: Path, force: bool) -> None:
    parent = out.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"{parent} {what}; create the folder first")
    if out.is_dir():
        raise UsageError(f"{out} is a folder; give a file name")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; use --force to replace it")


def _plan(args: argparse.Namespace) -> Callable[[], None]:
    """Check the options (UsageError, ConfigError); return what writes the file."""
    if args.kind == "demo":
        given = [name for name in SIZES if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise UsageError(f"{flags}: the demo model's sizes are fixed; drop {flags} or use "
                             "--kind random or successor")
        from backends.demo import write_demo_model

        return lambda: write_demo_model(args.out, ftype=args.ftype)
    from backends.ggml.writer import GPTJConfig, write_model

    sizes = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, (default, _) in SIZES.items()}
    config = GPTJConfig(**sizes, ftype=args.ftype)
    config.check()
    return lambda: write_model(args.out, config, seed=args.seed, kind=args.kind)
