"""Typed settings: one pydantic-settings class; env vars GPT4ALL_J_*, CLI flags from the same fields."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "GPT4ALL_J_"


class Settings(BaseSettings):
    """Server settings; every field is an env var GPT4ALL_J_<NAME> and a CLI flag --<name>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; use 0.0.0.0 to expose the server.")
    port: int = Field(4891, ge=0, le=65535, description="TCP port to listen on.")
    registry: Path = Field(Path("model_registry.yaml"), description="Path of the model registry YAML file.")
    default_max_queue: int = Field(
        64, ge=0, description="Requests that may wait per model when its registry entry sets no max_queue."
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per prompt) a request may ask for.")
    max_prompts: int = Field(16, ge=1, description="Largest number of prompts in one completions request.")
    load_timeout: float = Field(300.0, gt=0, description="Seconds a worker may take to load its model.")
    retry_after: int = Field(1, ge=1, description="Seconds sent in Retry-After when the queue is full.")
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    create_demo: bool = Field(True, description="Write registry models marked create_if_missing when absent.")
