"""The `gpt4all-j-server` command: serve, make-model, inspect, models list, pull, verify, convert."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from server.settings import ENV_PREFIX, Settings

PACKAGE = "gpt4all-j-server"
_SECRET_FIELDS = {"api_keys"}  # never echoed in error messages


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


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


class SettingsError(ValueError):
    """Flags or env vars that do not make valid Settings; the message names each one."""


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from env vars, overridden by the flags that were given; SettingsError if invalid."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError("\n".join(_describe_setting_error(e, given) for e in exc.errors())) from None


def _describe_setting_error(error: dict, given: dict) -> str:
    """One pydantic error as `invalid --flag VALUE: why` (or the env var that set it)."""
    why = error["msg"].removeprefix("Value error, ")
    why = why[:1].lower() + why[1:]
    field = str(error["loc"][0]) if error["loc"] else ""
    if field not in Settings.model_fields:
        return f"invalid settings: {why}"
    flag, env = "--" + field.replace("_", "-"), ENV_PREFIX + field.upper()
    value = given[field] if field in given else os.environ.get(env, error.get("input"))
    shown = "(hidden)" if field in _SECRET_FIELDS else shlex.quote(str(value))
    if field in given:
        return f"invalid {flag} {shown}: {why}"
    return f"invalid {env}={shown} (environment variable; the flag is {flag}): {why}"


def version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(PACKAGE)
    except PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .`)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    from server import make_model

    parser = argparse.ArgumentParser(prog=PACKAGE, description=__doc__)
    ver = f"{PACKAGE} {version()}"
    parser.add_argument("--version", action="version", version=ver, help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--version", action="version", version=ver, help="print the version and exit")
    add_settings_flags(serve)
    make_model.add_parser(sub)
    insp = sub.add_parser("inspect", help="validate a GGML GPT-J file and describe it")
    insp.add_argument("file", type=Path, help="the model file")
    _add_model_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """models list, pull, verify, convert (implemented in server.model_cli)."""
    reg_help = f"{Settings.model_fields['registry'].description} [env {ENV_PREFIX}REGISTRY]"
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
    pull.add_argument("--retries", type=non_negative_int, default=4,
                      help="retries of transient failures (default 4)")
    pull.add_argument("--retry-wait", type=non_negative_float, default=2.0,
                      help="seconds before the first retry, doubling after each (default 2)")
    pull.add_argument("--timeout", type=positive_float, default=60.0,
                      help="network timeout in seconds (default 60)")
    ver = sub.add_parser("verify", parents=[reg], help="check present model files against the registry's "
                                                       "checksums and the GGML inspector")
    ver.add_argument("id", nargs="?", help="model id or alias (default: every present model)")
    conv = sub.add_parser("convert", help="convert a legacy (pre-May-2023) GPT4All GGML file to the "
                                          "standard layout")
    conv.add_argument("src", type=Path, metavar="IN", help="the legacy-layout file")
    conv.add_argument("dst", type=Path, metavar="OUT", help="the standard-layout file to write")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:  # `... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "make-model":
        from server import make_model

        return make_model.run(args)
    if args.command == "inspect":
        return inspect_file(args.file)
    if args.command in ("models", "pull", "verify", "convert"):
        return _model_command(args)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return _serve(settings)


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


def inspect_file(path: Path) -> int:
    """`inspect FILE`: describe a valid file (exit 0) or say what is wrong with it (exit 1)."""
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
