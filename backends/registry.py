"""model_registry.yaml → validated model specs, and which of them can actually be served."""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backends.ggml.errors import LegacyModelFileError, convert_command, converted_path
from backends.ggml.reader import ModelFileError, ModelInfo, inspect_model, read_vocab
from backends.templates import BUILTIN_TEMPLATES, PromptTemplate
from backends.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """The registry file is invalid; the message names the file, the entry and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Strict):
    """Per-model defaults for parameters a request leaves out."""

    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k cut-off; 0 disables it.")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="Engine repetition penalty.")
    last_n_tokens: int = Field(64, ge=0, description="Tokens the repetition penalty looks back.")
    max_tokens: int | None = Field(None, ge=1, description="Chat default for max_tokens; None = up to the context.")


class TemplateSpec(_Strict):
    """A prompt template written as data in the registry."""

    system: str = "{content}\n"
    user: str = "{content}\n"
    assistant: str = "{content}\n"
    generation: str = ""


class ModelSpec(_Strict):
    """One registry entry."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    aliases: list[str] = []
    path: str = Field(description="Model file, relative to the registry file's folder.")
    url: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    md5: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    size: int | None = Field(None, ge=0)
    needs_conversion: bool = False
    description: str = ""
    model_type: Literal["gptj"] = "gptj"
    context_length: int | None = Field(None, ge=8)
    prompt_template: str = "gpt4all-j"
    system_prompt: str | None = None
    stop: list[str] = []
    sampling: SamplingDefaults = SamplingDefaults()
    workers: int = Field(1, ge=1, le=64)
    threads: int | None = Field(None, ge=1, le=256, description="Engine threads per worker; omitted = the "
                                                                 "usable CPUs divided by the workers.")
    batch_size: int = Field(8, ge=1, le=32)
    prefix_cache: bool = Field(True, description="Reuse the longest common token prefix between requests "
                                                 "on a worker, and route follow-ups to the worker holding it.")
    max_queue: int | None = Field(None, ge=0)
    max_tokens_cap: int | None = Field(None, ge=1, description="Largest max_tokens a request may ask for.")
    create_if_missing: Literal["demo"] | None = None
    owned_by: str = "gpt4all-j-server"

    @field_validator("aliases")
    @classmethod
    def _aliases_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("aliases repeat a name")
        return v


class RegistryFile(_Strict):
    """The whole registry file."""

    templates: dict[str, TemplateSpec] = {}
    models: list[ModelSpec] = Field(min_length=1)


@dataclass(frozen=True)
class ServedModel:
    """A registry entry whose file passed the inspector."""

    spec: ModelSpec
    path: Path
    info: ModelInfo
    template: PromptTemplate
    tokenizer: Tokenizer
    threads: int = 1  # engine threads per worker, resolved by `resolve`

    @property
    def context_length(self) -> int:
        """The context the server enforces (registry value, at most the file's n_ctx)."""
        return self.spec.context_length or self.info.n_ctx


def usable_cpus() -> int:
    """CPUs this process may run on (honours taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Registry:
    """Validated registry: what is served, what was skipped and why."""

    source: Path
    entries: list[ModelSpec]
    served: list[ServedModel]
    skipped: dict[str, str]

    def names(self) -> dict[str, ServedModel]:
        """Every id and alias of a served model."""
        table: dict[str, ServedModel] = {}
        for m in self.served:
            for name in (m.spec.id, *m.spec.aliases):
                table[name] = m
        return table


def load_registry_file(path: Path) -> RegistryFile:
    """Parse and validate the YAML file; errors name the file, the entry and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    try:
        parsed = RegistryFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise RegistryError(_describe(path, raw, exc)) from None
    _check_names(path, parsed)
    return parsed


def _describe(path: Path, raw: object, exc: ValidationError) -> str:
    """Turn pydantic's errors into lines naming file, model entry and field."""
    lines = [f"{path}: invalid model registry:"]
    for err in exc.errors():
        loc = list(err["loc"])
        where = "top level"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            idx = loc[1]
            entry = raw["models"][idx] if isinstance(raw, dict) else None
            ident = entry.get("id") if isinstance(entry, dict) else None
            where = f"models[{idx}]" + (f" (id {ident!r})" if ident else "")
            loc = loc[2:]
        elif len(loc) >= 2 and loc[0] == "templates":
            where = f"templates[{loc[1]!r}]"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or "(entry)"
        lines.append(f"  {where}: field '{field}': {err['msg']}")
    return "\n".join(lines)


def _check_names(path: Path, parsed: RegistryFile) -> None:
    """Ids and aliases must be unique across the registry; templates must exist."""
    seen: dict[str, str] = {}
    known = set(BUILTIN_TEMPLATES) | set(parsed.templates)
    for idx, m in enumerate(parsed.models):
        for field, name in [("id", m.id)] + [("aliases", a) for a in m.aliases]:
            if name in seen:
                raise RegistryError(
                    f"{path}: models[{idx}] (id {m.id!r}): field '{field}': name {name!r} "
                    f"is already used by model {seen[name]!r}"
                )
            seen[name] = m.id
        if m.prompt_template not in known:
            raise RegistryError(
                f"{path}: models[{idx}] (id {m.id!r}): field 'prompt_template': unknown template "
                f"{m.prompt_template!r} (known: {', '.join(sorted(known))})"
            )


def template_for(parsed: RegistryFile, name: str) -> PromptTemplate:
    """Resolve a template name: registry templates first, then the built-in ones."""
    if name in parsed.templates:
        return PromptTemplate(**parsed.templates[name].model_dump())
    return BUILTIN_TEMPLATES[name]


def entry_file(registry: Path, spec: ModelSpec) -> Path:
    """The absolute path of an entry's model file (relative paths are relative to the registry's folder)."""
    return (Path(registry).resolve().parent / spec.path).resolve()


def engine_threads(spec: ModelSpec, default: int = 0) -> int:
    """Threads per worker: the entry's, else `default`, else (0) the usable CPUs shared by its workers."""
    return spec.threads or default or max(1, usable_cpus() // spec.workers)


def resolve(path: Path, create_missing: bool = True, default_threads: int = 0) -> Registry:
    """Load the registry and find which entries can be served, writing the demo model if needed."""
    path = Path(path).resolve()
    parsed = load_registry_file(path)
    served: list[ServedModel] = []
    skipped: dict[str, str] = {}
    for idx, spec in enumerate(parsed.models):
        file = entry_file(path, spec)
        if not file.is_file() and spec.create_if_missing and create_missing:
            from backends.demo import write_demo_model

            log.info("writing the %s model to %s", spec.create_if_missing, file)
            write_demo_model(file)
        reason = _servable(path, idx, spec, file)
        if isinstance(reason, str):
            skipped[spec.id] = reason  # logged at startup by the app
            continue
        served.append(ServedModel(spec, file, reason, template_for(parsed, spec.prompt_template),
                                  Tokenizer(read_vocab(file)), engine_threads(spec, default_threads)))
    _warn_oversubscribed(served)
    return Registry(path, list(parsed.models), served, skipped)


def _servable(path: Path, idx: int, spec: ModelSpec, file: Path) -> ModelInfo | str:
    """The file's header info, or why the entry cannot be served."""
    if not file.is_file():
        if spec.url:
            how = f"download it with: gpt4all-j-server pull {spec.id}{_registry_option(path)}"
            if spec.needs_conversion:
                how += (" (it downloads and verifies the file, then converts GPT4All's pre-May-2023 GGML "
                        "layout to the standard one ctransformers reads)")
        else:
            how = "put the model file there"
        return f"file {file} is missing; {how}"
    try:
        info = inspect_model(file)
    except LegacyModelFileError as exc:
        return _legacy_reason(path, spec, file, exc)
    except ModelFileError as exc:
        return str(exc)
    if spec.context_length and spec.context_length > info.n_ctx:
        raise RegistryError(
            f"{path}: models[{idx}] (id {spec.id!r}): field 'context_length': {spec.context_length} "
            f"exceeds the file's n_ctx of {info.n_ctx}"
        )
    return info


def _legacy_reason(path: Path, spec: ModelSpec, file: Path, exc: LegacyModelFileError) -> str:
    """Why a legacy-layout file is not served, with the commands that convert it where the entry expects it."""
    if exc.damage is not None:
        return str(exc)
    out = converted_path(file)
    how = (f"convert it once, in place, with: {convert_command(file)} "
           f"&& mv {shlex.quote(str(out))} {shlex.quote(str(file))}")
    if spec.url and (spec.sha256 or spec.md5):
        how += f" (or: gpt4all-j-server pull {spec.id}{_registry_option(path)}, which also verifies it)"
    return (f"model file '{file}' uses GPT4All's legacy pre-May-2023 GGML layout, which ctransformers "
            f"cannot load; {how}")


def _registry_option(path: Path) -> str:
    """' --registry PATH' unless PATH is the default registry."""
    return "" if path == Path("model_registry.yaml").resolve() else f" --registry {shlex.quote(str(path))}"


def _warn_oversubscribed(served: list[ServedModel]) -> None:
    """Warn when the pool would run more engine threads than there are CPUs."""
    total = sum(m.spec.workers * m.threads for m in served)
    cpus = usable_cpus()
    if total > cpus:
        log.warning("registry asks for %d engine threads (workers x threads) on %d CPUs; "
                    "generation will be slower than with fewer", total, cpus)
