"""The errors a model file can raise, and how a legacy file is converted (the command to run)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

# The layout needs a one-time rewrite to the standard one; {command} is the command to run.
CONVERT_HINT = (
    "it needs a one-time conversion to the standard GGML layout (ftype + 2000, fp16 scales, "
    "repacked nibbles) before it can be served; convert it with: {command}"
)


def converted_path(path: str | os.PathLike) -> Path:
    """Suggested output of converting a legacy file: same folder, 'name.bin' -> 'name.converted.bin'."""
    return Path(path).with_name(f"{Path(path).stem}.converted{Path(path).suffix or '.bin'}")


def convert_command(path: str | os.PathLike) -> str:
    """The shell command that converts a legacy file to its suggested output (paths quoted as needed)."""
    return f"gpt4all-j-server convert {shlex.quote(str(path))} {shlex.quote(str(converted_path(path)))}"


class ModelFileError(ValueError):
    """A model file that cannot be served; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"model file '{self.path}': {problem}")


class LegacyModelFileError(ModelFileError):
    """GPT4All's pre-May-2023 GGML layout: loadable only after conversion to the standard layout."""

    damage: str | None = None  # set when the legacy file is also damaged (then it cannot be converted)
