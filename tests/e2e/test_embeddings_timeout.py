"""An embedding request that runs past --request-timeout is stopped with a 503 and frees the engine."""

from __future__ import annotations

import httpx
import numpy as np

from tests.batched import require_ggml
from tests.e2e.conftest import serve_registry, wait_for
from tests.models import write_random
from tests.schemas import validate

require_ggml()

REGISTRY = """
models:
  - id: slow
    path: {slow}
    prompt_template: plain
    engine: ggml
    parallel: 2
"""


def test_a_request_past_the_time_limit_is_stopped_and_the_engine_freed(tmp_path):
    path = write_random(tmp_path / "slow.bin", n_ctx=512, n_embd=256, n_layer=6, seed=3)
    # 200 inputs of 500 tokens: far more than 1 s of work for this model on any machine here
    inputs = [[int(t) for t in np.random.default_rng(i).integers(0, 512, 500)] for i in range(200)]
    for srv in serve_registry(REGISTRY.format(slow=path), tmp_path, {"GPT4ALL_J_REQUEST_TIMEOUT": "1"}):
        with httpx.Client(base_url=srv.url, timeout=120) as api:
            r = api.post("/embeddings", json={"model": "slow", "input": inputs})
            assert r.status_code == 503, r.text[:300]
            validate("error", r.json())
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("server_error", "request_timeout")
            assert "request_timeout (1 s)" in err["message"]

            def idle() -> bool:
                text = httpx.get(srv.base + "/metrics").text
                return 'gpt4all_j_workers_busy{model="slow"} 0.0' in text

            assert wait_for(idle, 30), "the engine still works on the stopped request"
            ok = api.post("/embeddings", json={"model": "slow", "input": "still served"})
            assert ok.status_code == 200 and len(ok.json()["data"]) == 1
