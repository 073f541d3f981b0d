"""The peers benchmark's OpenAI-compatible embeddings server: the request/response shape pgai's OpenAI
provider uses, the same vectors as pgsynapse's own model, and OpenAI-style errors."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from bench.embed_server import Encoder, make_server
from tests.helpers import V1_TORCH


@pytest.fixture(scope="module")
def base_url():
    server = make_server(Encoder(threads=1), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_embeddings_have_the_openai_shape_and_pgsynapse_vectors(base_url, models):
    texts = ["VACUUM reclaims storage occupied by dead tuples.", "CREATE INDEX builds an index."]
    status, body = _post(f"{base_url}/embeddings", {"input": texts, "model": "all-MiniLM-L6-v2",
                                                    "encoding_format": "float"})
    assert status == 200 and body["object"] == "list" and body["usage"]["total_tokens"] > 0
    assert [d["index"] for d in body["data"]] == [0, 1]
    vecs = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vecs.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    ours = models.get(V1_TORCH).encode(texts)
    assert (vecs * ours).sum(axis=1).min() > 0.999  # the same model: the same vectors


def test_bad_requests_get_openai_style_errors(base_url):
    status, body = _post(f"{base_url}/embeddings", {"input": [[101, 2023]], "model": "m"})
    assert status == 400 and "token arrays are not supported" in body["error"]["message"]
    status, body = _post(base_url.replace("/v1", "/v2/nothing"), {"input": "x"})
    assert status == 404
