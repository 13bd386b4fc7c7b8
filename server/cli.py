"""The `gpt4all-j-server` command: serve, make-model, inspect, models list, pull, verify, convert."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from server.settings import ENV_PREFIX, Settings

FTYPES = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _flag_type(annotation: object):
    if annotation is bool:
        return None
    origin = typing.get_origin(annotation)
    if origin is not None:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if args else str
    return annotation if annotation in (int, float, str, Path) else str


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One CLI flag per Settings field, with the field's description as help."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        helptext = f"{field.description} [env {env}; default {field.default}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                                help=helptext)
        else:
            parser.add_argument(flag, dest=name, default=None, type=_flag_type(field.annotation),
                                help=helptext)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from env vars, overridden by the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="gpt4all-j-server", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    add_settings_flags(sub.add_parser("serve", help="run the OpenAI-compatible HTTP server"))
    make = sub.add_parser("make-model", help="write a small GGML GPT-J model file")
    make.add_argument("out", type=Path)
    make.add_argument("--n-vocab", type=int, default=512)
    make.add_argument("--n-ctx", type=int, default=256)
    make.add_argument("--n-embd", type=int, default=64)
    make.add_argument("--n-head", type=int, default=4)
    make.add_argument("--n-layer", type=int, default=2)
    make.add_argument("--n-rot", type=int, default=8)
    make.add_argument("--ftype", choices=FTYPES, default="q4_0")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--kind", choices=["random", "successor", "demo"], default="random",
                      help="random weights, a successor model (greedy next token = next vocab entry), "
                           "or the bundled demo model")
    insp = sub.add_parser("inspect", help="validate a GGML GPT-J file and describe it")
    insp.add_argument("file", type=Path)
    _add_model_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """models list, pull, verify, convert (implemented in server.model_cli)."""
    reg_help = f"model registry YAML file [env {ENV_PREFIX}REGISTRY; default model_registry.yaml]"
    reg = argparse.ArgumentParser(add_help=False)
    reg.add_argument("--registry", type=Path, default=None, help=reg_help)
    models = sub.add_parser("models", help="list the registry's models and the state of their files",
                            parents=[reg])
    models.add_argument("--json", action="store_true", help="machine-readable output")
    msub = models.add_subparsers(dest="models_command")
    lst = msub.add_parser("list", help="every registry entry: present/missing, size, checksum state, "
                                       "layout, path")
    # SUPPRESS: `models --registry X list` must not be reset by the sub-subcommand's defaults
    lst.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help=reg_help)
    lst.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    pull = sub.add_parser("pull", parents=[reg], help="download a registry model (resumable), verify its "
                                                      "checksum and convert it if needed")
    pull.add_argument("id", help="model id or alias")
    pull.add_argument("--force", action="store_true", help="download again even if the file verifies")
    pull.add_argument("--keep-original", action="store_true",
                      help="keep the downloaded legacy-layout file (<path>.legacy) after converting it")
    pull.add_argument("--retries", type=int, default=4, help="retries of transient failures (default 4)")
    pull.add_argument("--retry-wait", type=float, default=2.0,
                      help="seconds before the first retry, doubling after each (default 2)")
    pull.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    ver = sub.add_parser("verify", parents=[reg], help="check present model files against the registry's "
                                                       "checksums and the GGML inspector")
    ver.add_argument("id", nargs="?", help="model id or alias (default: every present model)")
    conv = sub.add_parser("convert", help="convert a legacy (pre-May-2023) GPT4All GGML file to the "
                                          "standard layout")
    conv.add_argument("src", type=Path, metavar="IN")
    conv.add_argument("dst", type=Path, metavar="OUT")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "make-model":
        return _make_model(args)
    if args.command == "inspect":
        return _inspect(args.file)
    if args.command in ("models", "pull", "verify", "convert"):
        return _model_command(args)
    return _serve(settings_from_args(args))


def _model_command(args: argparse.Namespace) -> int:
    from server import model_cli as mc
    from server import model_pull as mp

    try:
        if args.command == "convert":
            return mp.cmd_convert(args.src, args.dst, args.overwrite)
        path = mc.registry_path(args.registry)
        if args.command == "models":
            return mc.cmd_list(path, args.json)
        if args.command == "verify":
            return mc.cmd_verify(path, args.id)
        return mp.cmd_pull(path, args.id, force=args.force, keep_original=args.keep_original,
                           retries=args.retries, retry_wait=args.retry_wait, timeout=args.timeout)
    except mc.CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _make_model(args: argparse.Namespace) -> int:
    if args.kind == "demo":
        from backends.demo import write_demo_model

        write_demo_model(args.out, ftype=args.ftype)
    else:
        from backends.ggml.writer import GPTJConfig, write_model

        config = GPTJConfig(n_vocab=args.n_vocab, n_ctx=args.n_ctx, n_embd=args.n_embd,
                            n_head=args.n_head, n_layer=args.n_layer, n_rot=args.n_rot, ftype=args.ftype)
        write_model(args.out, config, seed=args.seed, kind=args.kind)
    print(f"wrote {args.out}")
    return _inspect(args.out)


def _inspect(path: Path) -> int:
    from backends.ggml.reader import ModelFileError, inspect_model

    try:
        print(inspect_model(path).describe())
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(settings: Settings) -> int:
    from server.serve import run

    return run(settings)
