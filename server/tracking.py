"""Per-request accounting: TTFT, tokens, queue wait and speed, into metrics and the access record."""

from __future__ import annotations

import logging
import time

from backends.types import Finished, Started, Tokens
from server.metrics import Metrics
from server.middleware import RequestRecord
from server.runner import Run
from server.streaming import ChoiceState

log = logging.getLogger("gpt4all_j_server")


class Tracker:
    """Watches a request's events and records what the operator needs to see."""

    def __init__(self, metrics: Metrics, model: str, record: RequestRecord, run: Run,
                 states: list[ChoiceState]) -> None:
        self.metrics, self.model, self.record, self.run, self.states = metrics, model, record, run, states
        self.first_token: float | None = None
        self.closed = False
        self.timed_out = False

    def see(self, index: int, event: object) -> None:
        """Note one engine event."""
        if isinstance(event, Tokens) and self.first_token is None:
            self.first_token = time.monotonic()
            self.record.ttft = self.first_token - self.record.started
            self.metrics.ttft.labels(model=self.model).observe(self.record.ttft)
        elif isinstance(event, Started):
            handle = next((h for h in self.run.handles if h.tag == index), None)
            if handle is not None and handle.queue_wait is not None:
                self.metrics.queue_wait.labels(model=self.model).observe(handle.queue_wait)
        elif isinstance(event, Finished) and event.timed_out and not self.timed_out:
            self.timed_out = True  # one deadline per request: say it once
            log.warning("request %s hit the generation time limit (choice %d after %d tokens); its unfinished "
                        "choices end with 'length'", self.record.request_id, index, event.completion_tokens)

    def close(self) -> None:
        """Count the request's tokens once, when it ends."""
        if self.closed:
            return
        self.closed = True
        prompt = sum(s.prompt_tokens for s in self.states if s.index % self.run.plan.n == 0)
        completion = sum(s.completion_tokens for s in self.states)
        self.record.prompt_tokens, self.record.completion_tokens = prompt, completion
        self.metrics.prompt_tokens.labels(model=self.model).inc(prompt)
        self.metrics.completion_tokens.labels(model=self.model).inc(completion)
        if self.first_token is not None and completion > 1:
            elapsed = time.monotonic() - self.first_token
            if elapsed > 0:
                self.metrics.tokens_per_second.labels(model=self.model).observe((completion - 1) / elapsed)
