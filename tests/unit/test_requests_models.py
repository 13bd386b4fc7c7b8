"""Which error a model name gets: unknown, registered but not downloaded, or registered but not loadable."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from backends.registry import ModelSpec, Registry, ServedModel
from backends.templates import BUILTIN_TEMPLATES
from backends.tokenizer import Tokenizer
from server.errors import APIError
from server.middleware import RequestRecord
from server.service import InferenceService
from server.settings import Settings

LOADED = ModelSpec(id="loaded", path="/srv/models/loaded.bin", aliases=["l"])
BROKEN = ModelSpec(id="broken", path="/srv/models/broken.bin", aliases=["b"])
MISSING = ModelSpec(id="missing", path="missing.bin", aliases=["gone"], url="http://example.invalid/m.bin")
INVALID = ModelSpec(id="invalid", path="invalid.bin")


def service() -> InferenceService:
    info = SimpleNamespace(n_vocab=256, n_ctx=64, eos_token_id=0)
    tokenizer = Tokenizer([bytes([b]) for b in range(256)])
    served = [ServedModel(spec, Path(spec.path), info, BUILTIN_TEMPLATES["plain"], tokenizer)
              for spec in (LOADED, BROKEN)]
    registry = Registry(Path("/srv/registry.yaml"), [LOADED, BROKEN, MISSING, INVALID], served,
                        skipped={"missing": "file /srv/missing.bin is missing", "invalid": "bad magic"},
                        unavailable={"missing": "registered but not downloaded: run `gpt4all-j-server pull missing` "
                                                "on the server",
                                     "invalid": "registered but its model file on the server is not a valid model "
                                                "(see the server log)"},
                        not_downloaded=frozenset({"missing"}))
    pools = {"loaded": object()}
    pool = SimpleNamespace(get=pools.get, failed={"broken": "the worker exited while loading /srv/models/broken.bin: "
                                                            "file is truncated"})
    return InferenceService(registry, pool, Settings(retry_after=2), metrics=None)


def error_for(name: str) -> tuple[APIError, RequestRecord]:
    record = RequestRecord("r")
    with pytest.raises(APIError) as err:
        service().resolve(name, record)
    return err.value, record


def test_a_served_model_by_id_or_alias():
    record = RequestRecord("r")
    assert service().resolve("l", record).spec.id == "loaded" and record.model == "loaded"


@pytest.mark.parametrize("name", ["missing", "gone"])
def test_registered_but_not_downloaded_is_a_404_that_says_how_to_get_it(name):
    err, record = error_for(name)
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "not downloaded" in err.message and "gpt4all-j-server pull missing" in err.message
    assert record.model == "missing"


@pytest.mark.parametrize("name", ["broken", "b"])
def test_registered_but_failed_to_load_is_a_503_that_names_no_server_detail(name):
    err, record = error_for(name)
    assert (err.status, err.code, err.type) == (503, "model_unavailable", "server_error")
    assert "could not load it" in err.message and "/ready" in err.message
    assert "/srv" not in err.message and "broken.bin" not in err.message  # the reason stays in the log
    assert err.headers == {"Retry-After": "2"} and record.model == "broken"


def test_registered_but_an_invalid_file_is_a_503():
    err, record = error_for("invalid")
    assert err.status == 503 and "not a valid model" in err.message and record.model == "invalid"


def test_an_unknown_model_is_a_plain_404_and_the_record_names_no_model():
    err, record = error_for("nope")
    assert (err.status, err.code) == (404, "model_not_found") and "does not exist" in err.message
    assert record.model is None
