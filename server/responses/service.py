"""POST/GET/DELETE /v1/responses: translate to the chat service, shape the answer, keep it in the store."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from server.errors import APIError, bad_request, response_not_found
from server.lifecycle import Lifecycle
from server.middleware import RequestRecord
from server.protocol.responses_api import CreateResponse, DeletedResponse, InputItemList
from server.responses.build import Shell, from_chat
from server.responses.events import ResponseEvents
from server.responses.items import new_id, normalise, replayed
from server.responses.store import ResponseStore, StoreError
from server.responses.translate import chat_request, check_request, renamed
from server.service import InferenceService

log = logging.getLogger("gpt4all_j_server.responses")


class ResponsesService:
    """The Responses API over the chat service (which does templates, context checks, sampling, grammars)."""

    def __init__(self, chat: InferenceService, store: ResponseStore, max_row_bytes: int) -> None:
        self.chat = chat
        self.store = store
        self.max_row_bytes = max_row_bytes

    async def create(self, req: CreateResponse, disconnected: Callable, record: RequestRecord,
                     lifecycle: Lifecycle | None = None) -> dict | ResponseEvents:
        """POST /v1/responses: the response as JSON, or its event stream."""
        check_request(req)
        try:
            model = self.chat.resolve(req.model, record)
        except APIError as exc:
            record.outcome = f"error:{exc.code}"
            raise
        items = normalise(req.input)
        history: list[dict] = []
        if req.previous_response_id is not None:
            previous = await self._read(self.store.get, req.previous_response_id, param="previous_response_id")
            if previous is None:
                raise APIError(400, f"Previous response with id '{req.previous_response_id[:100]}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
            history = replayed(previous.items, previous.response["output"])
        stored = bool(req.store) and self.store.enabled
        all_items = history + items
        if stored:
            self._check_row(all_items, bool(history))
        chat_req, params = chat_request(req, history, items)
        sampling = model.spec.sampling
        shell = Shell(new_id("resp"), int(time.time()), model.spec.id, req,
                      sampling.temperature if req.temperature is None else req.temperature,
                      sampling.top_p if req.top_p is None else req.top_p, stored)
        try:
            result = await self.chat.chat(chat_req, disconnected, record, lifecycle)
        except APIError as exc:
            raise renamed(exc, params) from None

        async def save(response: dict) -> None:
            if stored:
                await self._save(response, all_items)

        if isinstance(result, dict):
            response = from_chat(shell, result)
            await save(response)
            return response
        return ResponseEvents(result, shell, save)

    def _check_row(self, items: list[dict], chained: bool) -> None:
        """A stored row is at most the body cap (the output, bounded by the context, comes on top)."""
        size = len(json.dumps(items, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if size > self.max_row_bytes:
            param = "previous_response_id" if chained else "input"
            raise bad_request(f"The conversation is {size} bytes, more than the {self.max_row_bytes} bytes a "
                              f"stored response may hold; send store: false, or start a new conversation.",
                              param, "conversation_too_large")

    async def _save(self, response: dict, items: list[dict]) -> None:
        """Store the response; if that fails it is still sent, echoing store: false (the log says why)."""
        try:
            await self.store.run(self.store.put, response, items)
        except StoreError as exc:
            log.error("could not store response %s: %s", response["id"], exc)
            response["store"] = False
        except Exception:
            log.exception("could not store response %s", response["id"])
            response["store"] = False

    async def _read(self, method: Callable, *args, param: str | None = None):
        """A store read; a file that cannot be used is a 503 that says so (not a 500, not a 404)."""
        try:
            return await self.store.run(method, *args)
        except StoreError as exc:
            log.error("stored responses are unavailable: %s", exc)
            reason = str(exc.__cause__ or exc)
            raise APIError(503, f"Stored responses are unavailable: the server cannot use its responses store "
                                f"({reason}). The server's log says more.", type="server_error", param=param,
                           code="store_unavailable") from None

    async def retrieve(self, response_id: str) -> dict:
        """GET /v1/responses/{id}."""
        found = await self._read(self.store.get, response_id)
        if found is None:
            raise response_not_found(response_id)
        return found.response

    async def delete(self, response_id: str) -> dict:
        """DELETE /v1/responses/{id}."""
        if not await self._read(self.store.delete, response_id):
            raise response_not_found(response_id)
        return DeletedResponse(id=response_id).model_dump()

    async def input_items(self, response_id: str, limit: int, order: str, after: str | None) -> dict:
        """GET /v1/responses/{id}/input_items: the input items (a chain's history included), paged."""
        found = await self._read(self.store.get, response_id)
        if found is None:
            raise response_not_found(response_id)
        items = found.items if order == "asc" else found.items[::-1]
        if after is not None:
            ids = [i.get("id") for i in items]
            if after not in ids:
                raise bad_request(f"No input item with id '{after[:100]}' in this response.", "after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit).model_dump()
