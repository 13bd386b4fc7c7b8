"""model_registry.yaml → validated model specs, and which of them can actually be served."""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backends.ggml.errors import LegacyModelFileError, convert_command, converted_path
from backends.ggml.reader import ModelFileError, ModelInfo, inspect_model, read_vocab
from backends.registry_budget import check_budget, fit_default_slots
from backends.registry_load import RegistryError, describe_kind, read_yaml, where
from backends.registry_paths import is_default_registry, locate_registry
from backends.templates import BUILTIN_TEMPLATES, PromptTemplate
from backends.tokenizer import Tokenizer

__all__ = ["ModelSpec", "Registry", "RegistryError", "RegistryFile", "ServedModel", "entry_file",
           "load_registry_file", "locate_registry", "resolve"]

log = logging.getLogger(__name__)


DEFAULT_PARALLEL = 8  # sequences the ggml engine decodes together when an entry does not say


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
    # tool calling (backends.templates.PromptTemplate documents each; omitted: the built-in defaults)
    tool_marker: str | None = Field(None, min_length=1)
    tools: str | None = None
    tool: str | None = None
    tool_call: str | None = None
    tool_result: str | None = None


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
    engine: Literal["ctransformers", "ggml"] = Field("ggml", description="ctransformers: one sequence "
                                                     "per worker process; ggml: the batched engine, `parallel` "
                                                     "sequences decoded together in each process.")
    parallel: int | None = Field(None, ge=1, le=64, description="Sequences the ggml engine decodes together "
                                                                "per process (engine ggml only; default 8).")
    prefix_cache: bool = Field(True, description="Reuse the longest common token prefix between requests "
                                                 "on a worker, and route follow-ups to the worker holding it.")
    max_queue: int | None = Field(None, ge=0)
    max_tokens_cap: int | None = Field(None, ge=1, description="Largest max_tokens a request may ask for.")
    create_if_missing: Literal["demo"] | None = None
    owned_by: str = "gpt4all-j-server"

    @property
    def slots(self) -> int:
        """Sequences one process of this entry runs at once."""
        return (self.parallel or DEFAULT_PARALLEL) if self.engine == "ggml" else 1

    @field_validator("aliases")
    @classmethod
    def _aliases_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("aliases repeat a name")
        return v


class RegistryFile(_Strict):
    """The whole registry file."""

    model_dir: str | None = Field(None, min_length=1, description="Folder that relative model paths are "
                                                                 "relative to (itself relative to the registry "
                                                                 "file's folder; ~ expands); default: the "
                                                                 "registry file's folder.")
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
    skipped: dict[str, str]  # id -> why it is not served (for the log: names files)
    unavailable: dict[str, str] = field(default_factory=dict)  # id -> the same for clients (no file paths)
    not_downloaded: frozenset[str] = frozenset()  # ids of skipped entries whose file is simply absent

    def names(self) -> dict[str, ServedModel]:
        """Every id and alias of a served model."""
        table: dict[str, ServedModel] = {}
        for m in self.served:
            for name in (m.spec.id, *m.spec.aliases):
                table[name] = m
        return table

    def unserved(self, name: str) -> tuple[str, str] | None:
        """(model id, reason) when `name` is the id or alias of an entry that is registered but not served.

        The reason completes "The model `NAME` is ..." and names no file path, e.g. "registered but not
        downloaded: run `gpt4all-j-server pull ID` on the server".
        """
        served = {m.spec.id for m in self.served}
        for spec in self.entries:
            if spec.id not in served and (name == spec.id or name in spec.aliases):
                return spec.id, self.unavailable.get(spec.id, "registered but not served (see the server log)")
        return None


def load_registry_file(path: Path) -> RegistryFile:
    """Parse and validate the YAML file; errors name the file, the entry and the field."""
    raw = read_yaml(path)
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
        ident = None
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int) and isinstance(raw, dict):
            entry = raw["models"][loc[1]]
            ident = entry.get("id") if isinstance(entry, dict) else None
        place = where(loc, ident)
        if len(loc) == 2 and loc[0] in ("models", "templates"):
            place += ": field '(entry)'"
        lines.append(f"  {place}: {err['msg']}")
    return "\n".join(lines)


def _check_names(path: Path, parsed: RegistryFile) -> None:
    """Ids and aliases must be unique across the registry; templates must exist."""
    seen: dict[str, str] = {}
    known = set(BUILTIN_TEMPLATES) | set(parsed.templates)
    for idx, m in enumerate(parsed.models):
        for key, name in [("id", m.id)] + [("aliases", a) for a in m.aliases]:
            if name in seen:
                raise RegistryError(
                    f"{path}: models[{idx}] (id {m.id!r}): field '{key}': name {name!r} "
                    f"is already used by model {seen[name]!r}"
                )
            seen[name] = m.id
        if m.parallel is not None and m.engine != "ggml":
            raise RegistryError(
                f"{path}: models[{idx}] (id {m.id!r}): field 'parallel': only the ggml engine decodes sequences "
                f"together (this entry uses engine {m.engine!r}; set `engine: ggml` or use `workers`)"
            )
        if m.prompt_template not in known:
            raise RegistryError(
                f"{path}: models[{idx}] (id {m.id!r}): field 'prompt_template': unknown template "
                f"{m.prompt_template!r} (known: {', '.join(sorted(known))})"
            )


def template_for(parsed: RegistryFile, name: str) -> PromptTemplate:
    """Resolve a template name: registry templates first, then the built-in ones."""
    if name in parsed.templates:
        return PromptTemplate(**parsed.templates[name].model_dump(exclude_none=True))
    return BUILTIN_TEMPLATES[name]


def model_root(registry: Path, model_dir: str | None = None) -> Path:
    """The folder relative model paths start from: model_dir (relative to the registry's folder), else that folder."""
    folder = Path(registry).resolve().parent
    return (folder / Path(model_dir).expanduser()).resolve() if model_dir else folder


def entry_file(registry: Path, spec: ModelSpec, model_dir: str | None = None) -> Path:
    """The absolute path of an entry's model file (relative paths are relative to the model folder)."""
    return (model_root(registry, model_dir) / spec.path).resolve()


def file_problem(file: Path) -> str | None:
    """None for a regular file, else what the path is instead ("missing", "a directory", ...); never opens it."""
    try:
        kind = describe_kind(file.stat().st_mode)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return kind


def engine_threads(spec: ModelSpec, default: int = 0) -> int:
    """Threads per worker: the entry's, else `default`, else (0) the usable CPUs shared by its workers."""
    return spec.threads or default or max(1, usable_cpus() // spec.workers)


def resolve(path: Path, create_missing: bool = True, default_threads: int = 0, max_workers: int | None = None,
            memory_budget_mb: int | None = None) -> Registry:
    """Load the registry and find which entries can be served, writing the demo model if needed.

    max_workers / memory_budget_mb (None = unchecked; a budget of 0 = the machine's memory) refuse, with a
    RegistryError, a registry whose served entries need more worker processes or memory than that.
    """
    path = Path(path).resolve()
    parsed = load_registry_file(path)
    served: list[ServedModel] = []
    skipped: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    absent: set[str] = set()
    files: dict[Path, tuple[ModelInfo, Tokenizer]] = {}  # servable files (entries may share one)
    for idx, spec in enumerate(parsed.models):
        file = entry_file(path, spec, parsed.model_dir)
        if spec.create_if_missing and create_missing and file_problem(file) == "missing":
            from backends.demo import write_demo_model

            log.info("writing the %s model to %s", spec.create_if_missing, file)
            write_demo_model(file)
        if file not in files:
            found = _servable(path, spec, file)
            if isinstance(found, tuple):
                skipped[spec.id], unavailable[spec.id] = found  # logged at startup by the app
                if file_problem(file) == "missing":
                    absent.add(spec.id)
                continue
            files[file] = found, Tokenizer(read_vocab(file))
        info, tokenizer = files[file]
        _check_context(path, idx, spec, info)
        served.append(ServedModel(spec, file, info, template_for(parsed, spec.prompt_template),
                                  tokenizer, engine_threads(spec, default_threads)))
    served = fit_default_slots(served, memory_budget_mb)
    check_budget(path, served, max_workers, memory_budget_mb)
    _warn_oversubscribed(served, default_threads)
    return Registry(path, list(parsed.models), served, skipped, unavailable, frozenset(absent))


def _servable(path: Path, spec: ModelSpec, file: Path) -> ModelInfo | tuple[str, str]:
    """The file's header info, or (why the entry cannot be served, the same for clients)."""
    problem = file_problem(file)
    if problem == "missing":
        return _missing_reason(path, spec, file)
    if problem is not None:
        return (f"model file {file} (field 'path' in {path}) is {problem}, not a model file",
                "registered but its model file on the server is not a file")
    try:
        return inspect_model(file)
    except LegacyModelFileError as exc:
        return _legacy_reason(path, spec, file, exc)
    except ModelFileError as exc:
        return str(exc), "registered but its model file on the server is not a valid model (see the server log)"
    except OSError as exc:
        return (f"model file {file} cannot be read: {exc.strerror or exc}",
                "registered but its model file on the server cannot be read")


def _check_context(path: Path, idx: int, spec: ModelSpec, info: ModelInfo) -> None:
    """An entry's context_length may not exceed its file's n_ctx."""
    if spec.context_length and spec.context_length > info.n_ctx:
        raise RegistryError(
            f"{path}: models[{idx}] (id {spec.id!r}): field 'context_length': {spec.context_length} "
            f"exceeds the file's n_ctx of {info.n_ctx}"
        )


def _missing_reason(path: Path, spec: ModelSpec, file: Path) -> tuple[str, str]:
    """Why an entry whose file is absent is skipped, and how to get the file."""
    pull = f"gpt4all-j-server pull {spec.id}{_registry_option(path)}"
    if not spec.url:
        return (f"file {file} is missing; put the model file there",
                "registered but its model file is not on the server")
    how = f"download it with: {pull}"
    if spec.needs_conversion:
        how += (" (it downloads and verifies the file, then converts GPT4All's pre-May-2023 GGML "
                "layout to the standard one ctransformers reads)")
    client = f"registered but not downloaded: run `gpt4all-j-server pull {spec.id}` on the server"
    return f"file {file} is missing; {how}", client  # the client's text names no server path


def _legacy_reason(path: Path, spec: ModelSpec, file: Path, exc: LegacyModelFileError) -> tuple[str, str]:
    """Why a legacy-layout file is not served, with the commands that convert it where the entry expects it."""
    public = "registered but its model file needs a one-time conversion (see the server log)"
    if exc.damage is not None:
        return str(exc), "registered but its model file on the server is damaged (see the server log)"
    out = converted_path(file)
    how = (f"convert it once, in place, with: {convert_command(file)} "
           f"&& mv {shlex.quote(str(out))} {shlex.quote(str(file))}")
    if spec.url and (spec.sha256 or spec.md5):
        pull = f"gpt4all-j-server pull {spec.id}{_registry_option(path)}"
        how += f" (or: {pull}, which also verifies it)"
        public = f"registered but its model file needs a one-time conversion: run `{pull}` on the server"
    return (f"model file '{file}' uses GPT4All's legacy pre-May-2023 GGML layout, which ctransformers "
            f"cannot load; {how}", public)


def _registry_option(path: Path) -> str:
    """' --registry PATH' unless PATH is the registry the command finds by itself in this folder."""
    return "" if is_default_registry(path) else f" --registry {shlex.quote(str(path))}"


def _warn_oversubscribed(served: list[ServedModel], default_threads: int = 0) -> None:
    """Warn when the engine threads someone chose (an entry's `threads`, or default_threads) exceed the CPUs.

    Entries without `threads` (with default_threads 0) get the usable CPUs divided by their own workers: each
    model alone may use the machine, so such automatic counts never warn, however many entries are served.
    """
    chosen = [(m, m.spec.threads or default_threads) for m in served if m.spec.threads or default_threads]
    total = sum(m.spec.workers * threads for m, threads in chosen)
    cpus = usable_cpus()
    if total > cpus:
        names = ", ".join(m.spec.id for m, _ in chosen[:5]) + (", ..." if len(chosen) > 5 else "")
        log.warning("registry asks for %d engine threads (workers x threads of %s) on %d CPUs; "
                    "generation will be slower than with fewer", total, names, cpus)
