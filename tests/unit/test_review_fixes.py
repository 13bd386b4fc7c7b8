"""Review findings on issue 9: log fields cannot be forged through the path; a bug still ends a stream cleanly."""

import asyncio
import json

import pytest

from server.middleware import log_path
from server.service import _ChatStream, _CompletionStream
from tests.unit.test_requests_render import FakeRun, stream


def test_the_logged_path_is_percent_encoded_so_it_cannot_split_fields():
    forged = b'/x%22%20200%20model=demo%20outcome=done'
    scope = {"raw_path": forged, "path": '/x" 200 model=demo outcome=done'}
    logged = log_path(scope)
    assert '"' not in logged and " " not in logged
    assert logged == '/x%22%20200%20model=demo%20outcome=done'


def test_a_path_without_raw_path_is_encoded_too():
    logged = log_path({"path": '/a "b"\n\x1b'})
    assert not any(c in logged for c in '" \n\x1b')


class _BrokenRun(FakeRun):
    async def events(self):
        raise RuntimeError("a bug in the event pipeline")
        yield  # pragma: no cover


@pytest.mark.parametrize("kind", [_CompletionStream, _ChatStream])
def test_an_unexpected_error_in_a_stream_ends_it_with_an_error_event_and_done(kind, monkeypatch):
    monkeypatch.setattr("tests.unit.test_requests_render.FakeRun", _BrokenRun)

    async def scenario():
        s, record = stream(kind, [])
        return [payload async for payload in s.events()], record

    out, record = asyncio.run(scenario())
    assert out[-1] == "[DONE]"
    assert json.loads(out[-2])["error"]["code"] == "internal_error"
    assert record.outcome == "error:internal_error"
