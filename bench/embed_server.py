"""A small OpenAI-compatible ``POST /v1/embeddings`` server for the peers benchmark: it serves the same base
model as pgsynapse's default (all-MiniLM-L6-v2 from the installed package, sentence-transformers on torch,
normalised vectors), so a peer that speaks the OpenAI API embeds with exactly the model pgsynapse uses.

    python -m bench.embed_server [--port 8765] [--threads N]

Prints ``listening on http://127.0.0.1:PORT/v1`` once the model is loaded. Stdlib only (no web framework).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgsynapse.models import default_model_path  # noqa: E402 - after the environment above


class Encoder:
    """The model behind a lock (one forward pass at a time, like a single-model inference server)."""

    def __init__(self, path: str | None = None, threads: int = 0, batch_size: int = 32) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(path or default_model_path()), device="cpu", local_files_only=True)
        self.batch_size = batch_size
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[list[float]]:
        with self.lock:
            vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return vecs.tolist()


def response(encoder: Encoder, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The OpenAI response for a request body, or an OpenAI-style error."""
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return 400, {"error": {"message": "input must be a string or a non-empty list of strings "
                                          "(token arrays are not supported)", "type": "invalid_request_error"}}
    vectors = encoder(texts)
    tokens = sum(max(1, len(t) // 4) for t in texts)  # an estimate, as the usage field only reports it
    return 200, {
        "object": "list",
        "model": body.get("model", ""),
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def make_server(encoder: Encoder, port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the benchmark prints its own results
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            if self.path.rstrip("/") not in ("/v1/embeddings", "/embeddings"):
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            self._send(*response(encoder, body))

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = cores)")
    p.add_argument("--model", default=None, help="model directory (default: the installed all-MiniLM-L6-v2)")
    args = p.parse_args()
    server = make_server(Encoder(args.model, args.threads), args.port)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
