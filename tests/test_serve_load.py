"""Load test: 16 concurrent clients × 20 mixed requests; no errors, and micro-batching changes no answer."""

from __future__ import annotations

import pytest
from serve_helpers import MODEL, build_index

from magic_mm.serve.app import create_app
from magic_mm.serve.batcher import BatchSettings
from magic_mm.serve.limits import ServeSettings
from magic_mm.serve.loadgen import check_answers, post, request_mix, run_load
from magic_mm.serve.runner import ServerThread

CLIENTS, PER_CLIENT = 16, 20


@pytest.fixture(scope="module")
def server(tiny_composed, tmp_path_factory):
    store = build_index(tiny_composed, tmp_path_factory.mktemp("load"))
    settings = ServeSettings(batch=BatchSettings(max_batch=32, max_wait_ms=10, max_queue=64))
    app = create_app(tiny_composed, MODEL, store, settings)
    with ServerThread(app) as running:
        yield running.url, app.state.service.batcher


def test_concurrent_mixed_load_has_no_errors_and_single_request_answers(server):
    url, batcher = server
    mix = request_mix()
    reference = []
    for path, body in mix:  # one at a time: these are the single-request answers
        status, answer, _ = post(url, path, body)
        assert status == 200, answer
        reference.append(answer)
    before = batcher.stats.batches, batcher.stats.requests

    result = run_load(url, mix, CLIENTS, PER_CLIENT)

    assert result.errors == []
    assert len(result.answers) == CLIENTS * PER_CLIENT
    assert check_answers(result, mix, reference) == []
    batches, requests = batcher.stats.batches - before[0], batcher.stats.requests - before[1]
    assert requests == CLIENTS * PER_CLIENT  # every request's embedding went through the batcher …
    assert batches < requests  # … and some were answered together (16 clients cannot all miss each other)
