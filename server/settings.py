"""Typed settings: one pydantic-settings class; env vars GPT4ALL_J_*, CLI flags from the same fields."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "GPT4ALL_J_"

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Server settings; every field is an env var GPT4ALL_J_<NAME> and a CLI flag --<name>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; use 0.0.0.0 to expose the server.")
    port: int = Field(4891, ge=0, le=65535, description="TCP port to listen on.")
    registry: Path = Field(Path("model_registry.yaml"), description="Path of the model registry YAML file.")
    # admission and time limits
    default_max_queue: int = Field(
        64, ge=0, description="Requests that may wait per model when its registry entry sets no max_queue."
    )
    queue_timeout: float = Field(60.0, ge=0, description="Seconds a request may wait for a worker (0 = no limit).")
    request_timeout: float = Field(600.0, ge=0,
                                   description="Seconds of generation per request; then it ends with "
                                               "finish_reason 'length' (0 = no limit).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per prompt) a request may ask for.")
    max_prompts: int = Field(16, ge=1, description="Largest number of prompts in one completions request.")
    retry_after: int = Field(1, ge=1, description="Seconds sent in Retry-After with a 503.")
    # workers
    load_timeout: float = Field(300.0, gt=0, description="Seconds a worker may take to load its model.")
    restart_limit: int = Field(5, ge=1, description="Worker crashes within restart_window that make a model "
                                                    "unavailable instead of restarting again.")
    restart_window: float = Field(60.0, gt=0, description="Seconds over which worker crashes are counted.")
    restart_cooldown: float = Field(30.0, gt=0, description="Seconds a crash-looping model stays unavailable "
                                                            "before it is tried again.")
    default_threads: int = Field(0, ge=0, le=256,
                                 description="Engine threads per worker for registry entries that set no "
                                             "`threads`; 0 = the usable CPUs divided by the entry's workers.")
    token_batch_ms: float = Field(2.0, ge=0, le=100,
                                  description="Tokens a worker produces within this many milliseconds of its "
                                              "last send go out together (fewer wake-ups when a model is "
                                              "faster than the client); 0 sends every token at once.")
    shutdown_grace: float = Field(30.0, ge=0, description="Seconds in-flight requests get to finish on "
                                                          "SIGTERM/SIGINT before they are cut.")
    # security
    api_keys: CommaList = Field([], description="Accepted API keys (comma-separated); none = no auth.")
    api_key_file: Path | None = Field(None, description="File with one accepted API key per line.")
    auth_health: bool = Field(False, description="Require a key for /health and /ready too.")
    auth_metrics: bool = Field(False, description="Require a key for /metrics too.")
    cors_origins: CommaList = Field([], description="Origins allowed by CORS (comma-separated); none = CORS off.")
    # operation
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    access_log: bool = Field(True, description="Write one access log line per request.")
    create_demo: bool = Field(True, description="Write registry models marked create_if_missing when absent.")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    def all_api_keys(self) -> list[str]:
        """Keys from the setting and the key file."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return keys
