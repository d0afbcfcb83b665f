"""The vLLM server client against a fake HTTP server (no vLLM): every request of a rollout batch is in
flight at once, and the blocking wait follows the length and names its key when it runs out (G19.1)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gspo.config.schema import Config
from gspo.rollout.base import SamplingParams
from gspo.rollout.vllm.server import (REQUEST_TIMEOUT_BASE_S, REQUEST_TIMEOUT_PER_TOKEN_S, ClientLimits,
                                      ServerError, VLLMServerEngine, client_limits)


class FakeServer:
    """Answers ``/version`` and ``/v1/completions``; a completion waits until ``together`` requests are in
    flight (a barrier), or ``delay_s``."""

    def __init__(self, together: int = 1, delay_s: float = 0.0) -> None:
        self.barrier = threading.Barrier(together, timeout=20)
        self.delay_s = delay_s
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer({"version": "fake"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(fake.delay_s)
                try:
                    fake.barrier.wait()
                except threading.BrokenBarrierError:
                    self.send_error(500, "not all requests of the batch arrived together")
                    return
                self._answer({"choices": [{"token_ids": [3], "logprobs": {"token_logprobs": [-0.5]}}]})

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the listen backlog: a whole batch connects at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_limits_follow_the_batch_and_the_length():
    config = Config()
    config.rollout.prompts_per_step, config.rollout.group_size, config.rollout.max_new_tokens = 32, 8, 8192
    limits = client_limits(config)
    assert limits.concurrency == 256  # the whole batch in flight (was a fixed 64)
    assert limits.timeout_s == REQUEST_TIMEOUT_BASE_S + REQUEST_TIMEOUT_PER_TOKEN_S * 8192  # was a fixed 600 s
    config.rollout.vllm_request_timeout_s = 90.0
    assert client_limits(config).timeout_s == 90.0


def test_every_request_of_a_batch_is_in_flight_at_once():
    rows = 80  # more than the old fixed cap of 64 client threads: the barrier would never open
    server = FakeServer(together=rows)
    engine = VLLMServerEngine(server.url, pad_token_id=0, eos_ids=[2], limits=ClientLimits(rows, 30.0))
    try:
        rollout = engine.generate([[1, 5]] * rows, SamplingParams(max_new_tokens=1), row_seeds=list(range(rows)))
        assert rollout.completion_ids.shape == (rows, 1)
    finally:
        engine.close()
        server.close()


def test_a_slow_answer_names_the_timeout_key():
    server = FakeServer(delay_s=3.0)
    engine = VLLMServerEngine(server.url, pad_token_id=0, eos_ids=[2], limits=ClientLimits(1, 1.0))
    try:
        with pytest.raises(ServerError, match="rollout.vllm_request_timeout_s"):
            engine.generate([[1, 5]], SamplingParams(max_new_tokens=1), row_seeds=[0])
    finally:
        engine.close()
        server.close()
