"""The README's curl examples, run verbatim against a server started on the bundled registry."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, start_server, stop_server

README_PORT = 4891


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The bundled model_registry.yaml, copied so the demo model is written outside the repo."""
    d = tmp_path_factory.mktemp("readme")
    shutil.copy(ROOT / "model_registry.yaml", d / "model_registry.yaml")
    srv = start_server(d / "model_registry.yaml", d / "server.log", port=README_PORT)
    yield srv
    stop_server(srv)


def curl_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if b.lstrip().startswith("curl")]


def test_readme_has_curl_examples():
    assert len(curl_examples()) >= 3


def test_readme_curl_examples_run_verbatim(default_server):
    for block in curl_examples():
        out = subprocess.run(["bash", "-c", "set -eo pipefail; " + block], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, (block, out.stderr)
        assert '"error"' not in out.stdout, (block, out.stdout)
        assert out.stdout.strip(), block
    log = default_server.logs()
    assert "not serving ggml-gpt4all-j-v1.3-groovy" in log
    assert "gpt4all-j-server pull ggml-gpt4all-j-v1.3-groovy" in log


def test_demo_model_answers(default_server):
    import httpx

    r = httpx.post(default_server.url + "/chat/completions", timeout=30,
                   json={"model": "demo", "messages": [{"role": "user", "content": "Who are you?"}],
                         "temperature": 0})
    assert r.status_code == 200
    assert "demo model of gpt4all-j-server" in r.json()["choices"][0]["message"]["content"]
