"""The responses store with a fake clock: expiry, the bound on how many are kept, delete, reopening the file."""

from __future__ import annotations

import pytest

from server.responses.store import ResponseStore, store_for

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def response(rid: str, text: str = "hi") -> dict:
    return {"id": rid, "object": "response", "output": [{"type": "message", "content": [{"text": text}]}]}


@pytest.fixture()
def clock():
    return Clock()


def test_nothing_is_created_until_the_first_store(tmp_path, clock):
    store = ResponseStore(tmp_path / "sub" / "r.sqlite3", 10, 30, clock)
    assert store.get("resp_x") is None and not store.delete("resp_x") and store.count() == 0
    assert not (tmp_path / "sub").exists()
    store.put(response("resp_a"), [{"type": "message"}])
    assert (tmp_path / "sub" / "r.sqlite3").exists()


def test_put_get_delete_and_reopen(tmp_path, clock):
    path = tmp_path / "r.sqlite3"
    store = ResponseStore(path, 10, 30, clock)
    store.put(response("resp_a", "é ✓"), [{"type": "message", "role": "user"}])
    found = store.get("resp_a")
    assert found.response == response("resp_a", "é ✓") and found.items == [{"type": "message", "role": "user"}]
    store.close()
    again = ResponseStore(path, 10, 30, clock)
    assert again.get("resp_a").response["id"] == "resp_a"
    assert again.delete("resp_a") and not again.delete("resp_a") and again.get("resp_a") is None


def test_expired_responses_are_not_served_and_are_pruned(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", 10, 2, clock)
    store.put(response("resp_old"), [])
    clock.now += 1 * DAY
    store.put(response("resp_new"), [])
    clock.now += 1.5 * DAY  # old: 2.5 days, new: 1.5 days
    assert store.get("resp_old") is None and store.get("resp_new") is not None
    assert not store.delete("resp_old")  # expired counts as gone
    assert store.count() == 2  # not pruned until the next store
    store.put(response("resp_next"), [])
    assert store.count() == 2 and store.get("resp_new") is not None


def test_no_expiry_with_ttl_zero(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", 10, 0, clock)
    store.put(response("resp_a"), [])
    clock.now += 10_000 * DAY
    assert store.get("resp_a") is not None


def test_the_oldest_go_beyond_the_bound(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", 3, 30, clock)
    for i in range(5):
        store.put(response(f"resp_{i}"), [])  # same clock time: insertion order decides
    assert store.count() == 3
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
    store.put(response("resp_2", "replaced"), [])  # replacing is not a new row
    assert store.count() == 3 and store.get("resp_3") is not None


def test_a_bound_of_zero_stores_nothing(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", 0, 30, clock)
    assert not store.enabled
    store.put(response("resp_a"), [])
    assert store.get("resp_a") is None and not (tmp_path / "r.sqlite3").exists()


def test_hostile_ids_are_data_not_sql(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", 10, 30, clock)
    store.put(response("resp_a"), [])
    evil = "x' OR '1'='1"
    assert store.get(evil) is None and not store.delete(evil) and store.get("resp_a") is not None
    store.put(response(evil), [])
    assert store.get(evil).response["id"] == evil


def test_the_file_defaults_to_the_data_folder(tmp_path):
    assert store_for(None, tmp_path, 5, 1).path == tmp_path.resolve() / "responses.sqlite3"
    assert store_for(tmp_path / "x.db", None, 5, 1).path == tmp_path / "x.db"
