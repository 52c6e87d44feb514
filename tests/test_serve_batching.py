"""Micro-batching over HTTP: a request answered inside a busy batch gets its single-request answer.

Grouping is made deterministic without timing: the batcher fires as soon as it holds
``max_batch`` inputs, and its wait is long, so requests sent together always share a
collection (texts in one forward pass, images in another, queries and candidates mixed).
The model runs in float32 and in bf16; bf16 answers must be bit-equal (fixed-size row blocks
in every product and row-by-row attention on padded batches make its rounding batch-invariant).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import make_image, skip_without_cpu_bf16
from serve_helpers import MODEL, data_url, post

from magic_mm import MagicEmbedder
from magic_mm.model.inputs import MMInput, prepare
from magic_mm.serve.app import create_app
from magic_mm.serve.batcher import BatchSettings, run_in_order
from magic_mm.serve.limits import ServeSettings
from magic_mm.serve.loadgen import vectors_of
from magic_mm.serve.runner import ServerThread

IMAGES = [make_image(72, 56, seed=40 + i) for i in range(2)]
# (body, what MagicEmbedder.encode gets for it: inputs and keyword arguments)
REQUESTS = [
    ({"input": "a dog on the beach"}, (["a dog on the beach"], {})),
    ({"input": ["a red car", "two children playing football in a park"]},
     (["a red car", "two children playing football in a park"], {})),
    ({"input": "a page about boats", "role": "candidate"}, (["a page about boats"], {"role": "candidate"})),
    ({"input": "boats", "instruction": "Find a document about this."},
     (["boats"], {"instruction": "Find a document about this."})),
    ({"input": [[{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}]], "role": "candidate"},
     ([IMAGES[0]], {"role": "candidate"})),
    ({"input": [[{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}}],
                "a text next to an image"], "dimensions": 16},
     ([MMInput(image=IMAGES[1], text="what is this?"), "a text next to an image"], {"dim": 16})),
]
INPUTS = sum(len(expected[0]) for _, expected in REQUESTS)  # 8


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_composed):
    skip_without_cpu_bf16(request.param)
    return tiny_composed if request.param == "float32" else MagicEmbedder.from_pretrained(MODEL, dtype="bfloat16")


@pytest.fixture(scope="module")
def servers(model):
    """A batching server that waits (up to a minute) until it holds all 8 inputs, and a plain one."""
    busy = create_app(model, MODEL, None, ServeSettings(batch=BatchSettings(max_batch=INPUTS, max_wait_ms=60_000)))
    alone = create_app(model, MODEL, None, ServeSettings(batch=BatchSettings(max_batch=1)))
    with ServerThread(busy) as busy_server, ServerThread(alone) as alone_server:
        yield busy_server.url, busy.state.service.batcher, alone_server.url


def test_answers_inside_a_mixed_batch_equal_single_request_answers(servers, model):
    busy_url, batcher, alone_url = servers
    single = []
    for body, _ in REQUESTS:
        status, answer = post(alone_url, "/v1/embeddings", body)
        assert status == 200, answer
        single.append(answer)
    before = len(batcher.stats.sizes)

    answers: list = [None] * len(REQUESTS)

    def send(i: int) -> None:
        answers[i] = post(busy_url, "/v1/embeddings", REQUESTS[i][0])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # all six requests were taken together: one pass for the 6 texts (queries, a candidate, a
    # custom instruction, a Matryoshka one) and one for the 2 image inputs
    assert batcher.stats.collected[-1] == len(REQUESTS)
    assert sorted(batcher.stats.sizes[before:]) == [2, 6]
    for (body, (inputs, kwargs)), alone, (status, batched) in zip(REQUESTS, single, answers):
        assert status == 200, batched
        got = vectors_of(batched)
        if model.backbone.dtype == torch.bfloat16:  # batch-invariant by construction: bit-equal
            np.testing.assert_array_equal(got, vectors_of(alone))
        else:  # float32 sums in another order in a bigger batch: equal to rounding
            np.testing.assert_allclose(got, vectors_of(alone), atol=1e-5, rtol=0)
        # encode normalises with torch, the server with numpy: the last float32 bit may differ
        np.testing.assert_allclose(got, model.encode(inputs, **kwargs), atol=1e-5, rtol=0)
        assert batched["usage"] == alone["usage"]


def test_a_bad_input_fails_only_its_own_request(servers):
    busy_url, _, _ = servers
    # the batcher fires at 8 inputs: 7 good ones, and one whose request is refused before it is queued
    good = {"input": ["one", "two", "three", "four", "five", "six", "seven"]}
    results: dict = {}

    def send(name: str, body: dict) -> None:
        results[name] = post(busy_url, "/v1/embeddings", body)

    threads = [threading.Thread(target=send, args=("bad", {"input": [[{"type": "image_url", "image_url": {
                   "url": "data:image/png;base64,AAAA"}}]]})),
               threading.Thread(target=send, args=("good", good)),
               threading.Thread(target=send, args=("last", {"input": "eight"}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["bad"][0] == 400 and results["bad"][1]["error"]["code"] == "bad_image"
    assert results["good"][0] == 200 and len(results["good"][1]["data"]) == 7
    assert results["last"][0] == 200


def test_usage_counts_do_not_run_the_vision_encoder(servers, model):
    """Counting visual tokens used to run the vision encoder once more per image, on the event loop."""
    _, _, alone_url = servers
    body = {"input": [[{"type": "image_url", "image_url": {"url": data_url(make_image(90, 70, seed=7))}}]]}
    assert post(alone_url, "/v1/embeddings", body)[0] == 200  # warm: the one count per tile layout
    backbone = model.backbone
    calls = []
    original = backbone.vision_grid
    backbone.vision_grid = lambda pixels: calls.append(len(pixels)) or original(pixels)
    try:
        status, answer = post(alone_url, "/v1/embeddings", {"input": [[{"type": "image_url", "image_url": {
            "url": data_url(make_image(64, 100, seed=8))}}]]})
    finally:
        del backbone.vision_grid
    assert status == 200 and answer["usage"]["prompt_tokens"] == backbone.visual_tokens(64, 100)
    assert calls == [1]  # the embedding itself, nothing else


def test_an_image_pass_is_split_over_single_threaded_workers_with_the_same_answers(tiny_composed, two_threads):
    from magic_mm.serve.app import Service

    split = Service(tiny_composed, MODEL, None, ServeSettings(batch=BatchSettings(image_workers=2)))
    whole = Service(tiny_composed, MODEL, None, ServeSettings(batch=BatchSettings(image_workers=1)))
    assert (split.image_workers, whole.image_workers) == (2, 1)
    ran = []
    inner = split._embed_in_batches

    def spy(items, prompts):
        ran.append((threading.current_thread().name, len(items), torch.get_num_threads()))
        return inner(items, prompts)

    split._embed_in_batches = spy
    try:
        items = [split.ready(prepare(make_image(60, 50, seed=60 + i))) for i in range(5)]
        prompts = [("candidate", None)] * 4 + [("query", "Find it.")]
        got = split._embed_raw(items, prompts)
        texts = split._embed_raw([prepare("a dog")] * 3, [("query", None)] * 3)
    finally:
        split.close()
    # Two parts (3 + 2 images), each on its own worker thread with 1 of the 2 intra-op threads;
    # the text pass stayed on the calling thread.
    assert sorted(n for _, n, _ in ran[:2]) == [2, 3]
    assert all(name.startswith("magic-mm-image") and threads == 1 for name, _, threads in ran[:2])
    assert ran[2][0] == threading.current_thread().name and ran[2][1] == 3
    np.testing.assert_allclose(got, whole._embed_raw(items, prompts), atol=1e-5, rtol=0)
    assert texts.shape[0] == 3
    # Closed (the server stopped): later passes still run, unsplit, on the calling thread.
    assert split.image_workers == 1
    np.testing.assert_allclose(split._embed_raw(items[:2], prompts[:2]), got[:2], atol=1e-5, rtol=0)
    assert ran[-1][0] == threading.current_thread().name


def test_pass_sizes_are_powers_of_two_up_to_max_batch():
    from magic_mm.serve.app import pass_size, pass_sizes

    assert [pass_size(n, 32) for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert pass_size(20, 24) == 24  # capped at max_batch
    assert pass_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert pass_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_padded_passes_give_the_unpadded_answers_and_warm_every_size(tiny_composed):
    """On a GPU (bucket_passes) a pass of 3 runs as 4, the last input repeated, and the extra row
    is dropped: the answers are the unpadded ones. The warm-up then runs every padded size."""
    from magic_mm.serve.app import Service

    settings = ServeSettings(batch=BatchSettings(max_batch=8, image_workers=1))
    padded, plain = Service(tiny_composed, MODEL, None, settings), Service(tiny_composed, MODEL, None, settings)
    padded.bucket_passes = True
    sizes = []
    inner = tiny_composed.embed_prompts

    def spy(prompts):
        sizes.append(len(prompts))
        return inner(prompts)

    items = [plain.ready(prepare(make_image(60, 50, seed=80 + i))) for i in range(3)]
    prompts = [("candidate", None)] * 2 + [("query", "Find it.")]
    expected = plain._embed_raw(items, prompts)
    tiny_composed.embed_prompts = spy
    try:
        got = padded._embed_raw(items, prompts)
        assert sizes == [4]
        sizes.clear()
        padded.warm_up()
    finally:
        del tiny_composed.embed_prompts
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert got.shape[0] == 3
    assert sizes == [1, 2, 4, 8] * 2  # texts, then images


def test_a_mixed_collection_runs_its_text_and_image_passes_side_by_side_with_the_same_answers(tiny_composed,
                                                                                             two_threads):
    """With image workers, the text pass runs on one worker while the photos run on the other:
    each waits at a barrier that only both passes running at once can pass."""
    from magic_mm.serve.app import Service

    service = Service(tiny_composed, MODEL, None, ServeSettings(batch=BatchSettings(image_workers=2)))
    inner = service._embed_in_batches
    both_running = threading.Barrier(2, timeout=30)
    ran: list[tuple[str, bool]] = []

    def spy(items, prompts):
        ran.append((threading.current_thread().name, items[0].image is not None))
        both_running.wait()
        return inner(items, prompts)

    texts = [prepare("a dog on the beach"), prepare("two children playing football in a park")]
    photos = [service.ready(prepare(make_image(60, 50, seed=70 + i))) for i in range(2)]
    passes = [(texts, [("query", None)] * 2), (photos, [("candidate", None), ("query", "Find it.")])]
    service._embed_in_batches = spy
    try:
        got = list(service._run_passes(passes))
    finally:
        service._embed_in_batches = inner
        service.close()
    assert [index for index, _ in got] == [0, 1]
    assert sorted(kind for _, kind in ran) == [False, True]  # one text pass, one photo pass (2 photos)
    assert len({name for name, _ in ran}) == 2 and all(name.startswith("magic-mm-image") for name, _ in ran)
    in_turn = [vectors for _, vectors in run_in_order(service._embed_raw)(passes)]
    for (_, vectors), expected in zip(got, in_turn):
        np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)


def test_the_text_worker_takes_photos_only_when_that_evens_the_workers():
    from magic_mm.serve.app import photos_beside_texts

    assert photos_beside_texts(7, 3, 2) == 0  # 7 queries weigh about as much as 3 photos
    assert photos_beside_texts(1, 8, 2) == 3  # 1 query + 3 photos against 5 photos
    assert photos_beside_texts(2, 1, 2) == 0
    assert photos_beside_texts(1, 8, 3) == 2  # 1 query + 2 photos against 3 photos on each of two workers
    assert photos_beside_texts(30, 2, 2) == 0


def test_no_image_workers_on_too_few_threads(tiny_composed, monkeypatch):
    import torch

    from magic_mm.serve.app import Service

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert Service(tiny_composed, MODEL, None, ServeSettings(batch=BatchSettings(image_workers=2))).image_workers == 1


def test_the_server_warms_every_model_thread_before_its_first_request(monkeypatch):
    """Startup runs a text pass and a split image pass, so each model thread has measured its
    products' batch-invariant call sizes (and oneDNN built its kernels) before any client waits."""
    skip_without_cpu_bf16()
    from magic_mm.model import packed_linear

    monkeypatch.setattr(packed_linear, "_invariant_calls", {})
    model = MagicEmbedder.from_pretrained(MODEL, dtype="bfloat16")
    app = create_app(model, MODEL, None, ServeSettings())
    service = app.state.service
    with ServerThread(app):
        measured = {key[3] for key in packed_linear._invariant_calls}  # thread counts measured on
    threads = torch.get_num_threads()
    workers = service.settings.batch.image_workers
    expected = {threads} | ({threads // workers} if threads >= workers > 1 else set())
    assert measured == expected


def test_a_large_jpeg_sent_to_the_server_is_decoded_like_the_same_file_embedded_locally(tiny_composed):
    """The server decodes a data: URL JPEG at the model's reduced scale too, so a photo sent over
    HTTP gets the vector ``encode`` gives the same bytes (and an index built from the file)."""
    import base64
    import io

    url = data_url(make_image(1000, 700, seed=9), "JPEG")
    jpeg = base64.b64decode(url.split(",", 1)[1])
    with ServerThread(create_app(tiny_composed, MODEL, None, ServeSettings())) as server:
        status, answer = post(server.url, "/v1/embeddings",
                              {"input": [[{"type": "image_url", "image_url": {"url": url}}]], "role": "candidate"})
    assert status == 200, answer
    expected = tiny_composed.encode([jpeg], role="candidate")[0]
    np.testing.assert_allclose(vectors_of(answer)[0], expected, atol=1e-5, rtol=0)
    full_size = tiny_composed.encode([Image.open(io.BytesIO(jpeg))], role="candidate")[0]
    assert np.abs(full_size - expected).max() > 1e-3  # the reduced scale did apply


def test_a_request_waits_for_company_from_its_arrival_and_whatever_is_queued_is_taken():
    """max_wait_ms counts from a request's arrival: requests that queued while a pass ran have
    waited already, so the next pass takes them at once (all of them) instead of waiting again
    for company; a request sent after that goes in the pass after."""
    import asyncio

    from magic_mm.serve.batcher import MicroBatcher

    calls: list[list[str]] = []
    first_running, release = threading.Event(), threading.Event()

    def embed(items, prompts):
        calls.append([item.text for item in items])
        if len(calls) == 1:
            first_running.set()
            release.wait(30)
        return np.ones((len(items), 4), dtype=np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(embed, BatchSettings(max_batch=32, max_wait_ms=300))
        batcher.start()
        try:
            a = asyncio.ensure_future(batcher.embed([prepare("a")], "query"))
            await asyncio.to_thread(first_running.wait, 30)
            queued = [asyncio.ensure_future(batcher.embed([prepare(t)], "query")) for t in ("b", "c")]
            await asyncio.sleep(0.45)  # b and c have now waited longer than max_wait_ms
            release.set()
            await asyncio.sleep(0.15)  # under the old rule, b's pass would still wait for company
            d = asyncio.ensure_future(batcher.embed([prepare("d")], "query"))
            await asyncio.gather(a, d, *queued)
        finally:
            batcher.stop()

    asyncio.run(scenario())
    assert calls == [["a"], ["b", "c"], ["d"]]


def test_the_warm_up_runs_on_the_batcher_thread_and_a_failed_one_stops_the_start():
    """The passes' thread is the one that warms up (its OpenMP team and kernels are the ones
    that serve), and startup fails loudly rather than serving unwarmed."""
    from magic_mm.serve.batcher import MicroBatcher

    ran_on: list[str] = []
    batcher = MicroBatcher(lambda items, prompts: np.zeros((len(items), 4), dtype=np.float32))
    batcher.start(first=lambda: ran_on.append(threading.current_thread().name))
    batcher.stop()
    assert ran_on == ["magic-mm-batcher"]

    def broken() -> None:
        raise RuntimeError("warm-up failed")

    failing = MicroBatcher(lambda items, prompts: np.zeros((len(items), 4), dtype=np.float32))
    with pytest.raises(RuntimeError, match="warm-up failed"):
        failing.start(first=broken)
    assert failing._thread is None


def test_a_model_loads_on_a_thread_that_ends_and_little_work_elsewhere_runs_on_one_thread(two_threads):
    """The load's OpenMP team ends with its thread (benchmarks/openmp_teams.py measures what that
    buys); ``one_intra_op_thread`` runs work on one intra-op thread and puts the count back."""
    from magic_mm.serve.app import load_on_own_thread, one_intra_op_thread

    loaded_on: list[threading.Thread] = []

    def load() -> str:
        loaded_on.append(threading.current_thread())
        return "model"

    assert load_on_own_thread(load) == "model"
    assert loaded_on[0] is not threading.current_thread() and not loaded_on[0].is_alive()
    with pytest.raises(ValueError, match="no such model"):
        load_on_own_thread(lambda: (_ for _ in ()).throw(ValueError("no such model")))
    counts: list[int] = []

    def single_threaded() -> None:
        with one_intra_op_thread():
            counts.append(torch.get_num_threads())
        counts.append(torch.get_num_threads())

    thread = threading.Thread(target=single_threaded)
    thread.start(), thread.join()
    assert counts == [1, 2]
