"""Which registry file to use: --registry/env, ./model_registry.yaml, or the per-user one (made on first run).

The per-user registry lives at $XDG_CONFIG_HOME/gpt4all-j-server/model_registry.yaml (default
~/.config/...). It is created from the default registry bundled in this package, with a `model_dir:` line
so its model files go to the per-user data folder ($XDG_DATA_HOME/gpt4all-j-server, default
~/.local/share/..., or the data_dir setting).
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

from backends.registry_load import RegistryError, read_yaml

log = logging.getLogger(__name__)

APP = "gpt4all-j-server"
REGISTRY_NAME = "model_registry.yaml"


def _xdg(var: str, fallback: str) -> Path:
    """An XDG base folder: the variable when it holds an absolute path (the spec ignores others), else ~/…."""
    value = os.environ.get(var, "")
    if value and os.path.isabs(value):
        return Path(value)
    try:
        return Path.home() / fallback
    except RuntimeError:  # no HOME and no passwd entry
        raise RegistryError(f"cannot find the home folder for the per-user registry; set {var} or pass "
                            "--registry") from None


def user_registry_path() -> Path:
    """$XDG_CONFIG_HOME/gpt4all-j-server/model_registry.yaml."""
    return _xdg("XDG_CONFIG_HOME", ".config") / APP / REGISTRY_NAME


def user_data_dir(data_dir: Path | None = None) -> Path:
    """The per-user data folder: data_dir, else $XDG_DATA_HOME/gpt4all-j-server."""
    return Path(data_dir).expanduser().resolve() if data_dir else _xdg("XDG_DATA_HOME", ".local/share") / APP


def bundled_registry_text() -> str:
    """The default registry shipped inside the package (equal to the repository's model_registry.yaml)."""
    return resources.files("backends").joinpath(REGISTRY_NAME).read_text(encoding="utf-8")


def default_registry() -> Path:
    """The registry used without --registry or the env: ./model_registry.yaml if present, else the per-user one."""
    here = Path.cwd() / REGISTRY_NAME
    return here if here.exists() else user_registry_path()


def is_default_registry(path: Path) -> bool:
    """True when `gpt4all-j-server pull ID` in this folder would use `path` without --registry."""
    try:
        return Path(path).resolve() == default_registry().resolve()
    except (RegistryError, OSError):
        return False


def find_registry(registry: Path | None, data_dir: Path | None = None) -> tuple[Path, str]:
    """(registry file, why it was chosen); creates the per-user registry when it is the one and is missing."""
    if registry is not None:
        return Path(registry), "given by --registry or GPT4ALL_J_REGISTRY"
    here = Path.cwd() / REGISTRY_NAME
    if here.exists():
        return here, "found in the current folder"
    user = user_registry_path()
    if user.exists() or user.is_symlink():
        if data_dir is not None:
            _check_model_dir(user, user_data_dir(data_dir))
        return user, "the per-user registry (no model_registry.yaml in the current folder)"
    models = user_data_dir(data_dir)
    _create_user_registry(user, models)
    return user, f"created the per-user registry from the default one; its model files go to {models}"


def _check_model_dir(registry: Path, wanted: Path) -> None:
    """Warn when data_dir differs from the model_dir of an existing per-user registry (which wins)."""
    try:
        raw = read_yaml(registry)
    except RegistryError:
        return  # loading the registry reports it
    have = raw.get("model_dir") if isinstance(raw, dict) else None
    if have != str(wanted):
        log.warning("data_dir %s is not used: the per-user registry %s sets model_dir: %s (it was created "
                    "with it); edit model_dir there to keep model files elsewhere", wanted, registry, have)


def locate_registry(registry: Path | None, data_dir: Path | None) -> Path:
    """The registry file to load (flag/env, ./model_registry.yaml, per-user), logging which and why."""
    path, why = find_registry(registry, data_dir)
    log.info("model registry: %s (%s)", path, why)
    return path


def _create_user_registry(path: Path, model_dir: Path) -> None:
    """Write the bundled registry, pointed at model_dir, to path (atomically: a racing first run is fine)."""
    text = (f"# Created by {APP} on first run from its default registry; edit it freely.\n"
            f"# Relative model paths below are relative to model_dir (the per-user data folder).\n"
            f"model_dir: {json.dumps(str(model_dir))}\n\n" + bundled_registry_text())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, path)  # never replaces a registry another process just created
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    except OSError as exc:
        raise RegistryError(f"{path}: cannot create the per-user registry: {exc.strerror or exc}; pass "
                            "--registry FILE or set XDG_CONFIG_HOME") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder could not be made: there is no temporary file
            pass
