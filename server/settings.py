"""Typed settings: one pydantic-settings class; env vars GPT4ALL_J_*, CLI flags from the same fields."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "GPT4ALL_J_"

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Server settings; every field is an env var GPT4ALL_J_<NAME> and a CLI flag --<name>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; use 0.0.0.0 to expose the server.")
    port: int = Field(4891, ge=0, le=65535, description="TCP port to listen on.")
    registry: Path | None = Field(
        None, description="Model registry YAML file. Unset: ./model_registry.yaml if present, else the per-user "
                          "registry in the config folder (created on first run with the demo model).")
    data_dir: Path | None = Field(None, description="Per-user data folder (models of the per-user registry, "
                                                    "state); unset = $XDG_DATA_HOME/gpt4all-j-server.")
    # admission and time limits
    default_max_queue: int = Field(
        64, ge=0, description="Requests that may wait per model when its registry entry sets no max_queue."
    )
    queue_timeout: float = Field(60.0, ge=0, description="Seconds a request may wait for a worker (0 = no limit).")
    request_timeout: float = Field(600.0, ge=0,
                                   description="Seconds of generation per request; then it ends with "
                                               "finish_reason 'length' (an embedding request with a 503 "
                                               "request_timeout; 0 = no limit).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024,
                                description="Largest request body accepted; on the wire a request may send at "
                                            "most twice this plus --max-header-bytes after its headers (chunk "
                                            "framing, trailers), else 413.")
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per prompt) a request may ask for.")
    max_prompts: int = Field(16, ge=1, description="Largest number of prompts in one completions request.")
    retry_after: int = Field(1, ge=1, description="Seconds sent in Retry-After with a 503 for a full queue.")
    # connections (the HTTP edge: safe on 0.0.0.0 without a proxy)
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024,
                                  description="Largest request line plus headers of one request (431 above).")
    max_headers: int = Field(100, ge=8, le=10_000, description="Most header fields in one request (431 above).")
    header_timeout: float = Field(10.0, gt=0, description="Seconds a client has to send a request's complete "
                                                          "headers, from connecting or from the request's first "
                                                          "byte; then the connection is closed (408 if part of a "
                                                          "request came).")
    body_timeout: float = Field(30.0, gt=0, description="Seconds a client has to send a request's whole body "
                                                        "once its headers are in (for a pipelined request: once "
                                                        "its turn comes); 408 after.")
    keep_alive_timeout: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection is kept "
                                                             "between requests (independent of --header-timeout).")
    max_connections: int = Field(0, ge=0, description="Most open client connections; beyond it the oldest idle "
                                                      "ones are closed first. 0 = the lower of 1024 and the "
                                                      "open-file limit less 64 and 8 per worker.")
    send_timeout: float = Field(60.0, gt=0, description="Seconds a streaming client may go without taking any "
                                                        "data once its buffer is full; then the stream ends.")
    # workers
    worker_stall_timeout: float = Field(60.0, gt=0,
                                        description="Seconds a busy worker may go without progress (a token, a "
                                                    "prompt chunk or a heartbeat) before it is killed and "
                                                    "replaced; its request ends with an error.")
    max_workers: int = Field(64, ge=1, description="Most worker processes a registry may start in all.")
    memory_budget_mb: int = Field(0, ge=0, description="Memory the workers may use in all, in MiB; a registry "
                                                       "that needs more is refused. 0 = the machine's (or "
                                                       "cgroup's) memory.")
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
    api_keys: CommaList = Field([], description="Accepted API keys (comma-separated); unset or empty = no auth; "
                                                 "a value with no key in it (e.g. ' , ') is refused.")
    api_key_file: Path | None = Field(None, description="File with one accepted API key per line.")
    auth_health: bool = Field(False, description="Require a key for /health and /ready too.")
    auth_metrics: bool = Field(False, description="Require a key for /metrics too.")
    auth_docs: bool = Field(True, description="Require a key for /docs, /redoc, their assets and /openapi.json "
                                              "too; --no-auth-docs lets a browser open the docs (they show the "
                                              "API, not its data).")
    cors_origins: CommaList = Field([], description="Origins allowed by CORS (comma-separated); none = CORS off.")
    # the chat page, embeddings and the Responses API
    ui: bool = Field(True, description="Serve the chat page at / (its files hold no data; when the server has "
                                       "keys, the page asks for one and keeps it in the browser).")
    max_embedding_inputs: int = Field(2048, ge=1, description="Most inputs in one /v1/embeddings request.")
    responses_db: Path | None = Field(None, description="SQLite file of stored Responses API responses (created "
                                                        "at the first one); unset = responses.sqlite3 in the "
                                                        "data folder.")
    responses_max_stored: int = Field(10_000, ge=0, description="Most stored responses; beyond it the oldest "
                                                                "are deleted (0 = store none: store is echoed "
                                                                "false).")
    responses_ttl_days: float = Field(30.0, ge=0, description="Days a stored response is kept: older ones are "
                                                              "not served and are deleted (0 = no expiry).")
    # operation
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format: text (one line, "
                                                                  "timestamped) or json (one object per line).")
    access_log: bool = Field(True, description="Write one access log line per request.")
    create_demo: bool = Field(True, description="Write registry models marked create_if_missing when absent.")

    # set when --api-keys / GPT4ALL_J_API_KEYS was given but holds no key (" , "): startup refuses it
    _api_keys_blank: bool = PrivateAttr(False)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            return [p.strip() if isinstance(p, str) else p for p in v if not isinstance(p, str) or p.strip()]
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _note_blank_api_keys(cls, data: object, handler):
        settings = handler(data)
        raw = data.get("api_keys") if isinstance(data, dict) else None
        # "" alone means unset (compose's `${VAR:-}`); " , ", " " or ["", " "] were meant to hold keys
        settings._api_keys_blank = raw not in (None, "", [], ()) and not settings.api_keys
        return settings

    def api_keys_blank(self) -> bool:
        """Whether api_keys was given a value that holds no key (e.g. " , "): a mistake, not "no auth"."""
        return self._api_keys_blank

    def all_api_keys(self) -> list[str]:
        """Keys from the setting and the key file (raises server.security.ConfigError; see load_api_keys)."""
        from server.security import load_api_keys

        return load_api_keys(self)
