"""First end-to-end checks through raw HTTP."""

from tests.schemas import usage_counts


def test_models_lists_only_served(client):
    r = client.get("/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == ["succ", "succ-tmpl", "rand", "slow"]


def test_completion_exact_text(client):
    r = client.post("/completions", json={"model": "succ", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "yz"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert usage_counts(body["usage"]) == (1, 2, 3)
