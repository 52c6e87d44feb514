"""The HTTP API on 127.0.0.1: OpenAI client round trips, rerank, search, auth and every limit."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import threading

import numpy as np
import pytest
from conftest import make_image
from serve_helpers import MODEL, build_index, data_url, post, request

from magic_mm.index.search import RerankerUnavailableError, embed_query, query_input, retrieve
from magic_mm.model.embedder import TextTruncatedWarning
from magic_mm.model.inputs import MMInput
from magic_mm.serve.app import create_app
from magic_mm.serve.limits import ServeSettings
from magic_mm.serve.runner import ServerThread

openai = pytest.importorskip("openai")


class FakeReranker:
    """Stands in for MagicReranker: scores a candidate by its position, reversed (last = best)."""

    def rerank(self, query, candidates, top_k=5):
        return np.arange(len(candidates), dtype=np.float64)


def unavailable(model: str):
    raise RerankerUnavailableError("reranking is not available in this magic-mm version (test)")


@pytest.fixture(scope="module")
def store(tiny_composed, tmp_path_factory):
    return build_index(tiny_composed, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(tiny_composed, store):
    app = create_app(tiny_composed, MODEL, store, ServeSettings(), reranker_loader=lambda model: FakeReranker())
    with ServerThread(app) as running:
        yield running.url


@pytest.fixture(scope="module")
def plain_server(tiny_composed, store):
    """No reranker; remote images allowed (the only remote server the tests use is on 127.0.0.1)."""
    app = create_app(tiny_composed, MODEL, store, ServeSettings(allow_remote_images=True),
                     reranker_loader=unavailable)
    with ServerThread(app) as running:
        yield running.url


LIMITS = ServeSettings(api_key="s3cret", max_body_bytes=300_000, max_image_bytes=100_000, max_image_pixels=250_000,
                       max_inputs=8, max_k=20)
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def guarded(tiny_composed, store):
    with ServerThread(create_app(tiny_composed, MODEL, store, LIMITS, reranker_loader=unavailable)) as running:
        yield running.url


def test_openai_client_round_trip_equals_encode(server, tiny_composed):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    texts = ["a dog on the beach", "two children playing football", "a red car"]
    response = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, tiny_composed.encode(texts), atol=1e-5)
    assert [d.index for d in response.data] == [0, 1, 2]
    assert response.model == MODEL and response.usage.prompt_tokens == sum(len(t.encode()) for t in texts)

    single = client.embeddings.create(model=MODEL, input="a dog on the beach", dimensions=16, encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, tiny_composed.encode(texts[:1], dim=16)[0], atol=1e-5)

    image = make_image(80, 60, seed=3)
    parts = [[{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}],
             [{"type": "image_url", "image_url": {"url": data_url(image)}}]]
    mixed = client.embeddings.create(model=MODEL, input=parts)
    expected = tiny_composed.encode([MMInput(image=image, text="what is this?"), image])
    np.testing.assert_allclose([d.embedding for d in mixed.data], expected, atol=1e-5)
    visual = tiny_composed.backbone.visual_tokens(80, 60)
    assert mixed.usage.prompt_tokens == 2 * visual + len("what is this?")


def test_candidate_role_and_base64_format(server, tiny_composed):
    status, body = post(server, "/v1/embeddings", {"model": MODEL, "input": ["a page about boats"],
                                                   "role": "candidate", "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, tiny_composed.encode(["a page about boats"], role="candidate")[0], atol=1e-5)


def test_an_over_long_instruction_is_cut_like_a_text(server, tiny_composed):
    """A request cannot make the LM run an instruction of any length: it is cut at
    max_text_tokens, as texts are, and answers like encode with the same instruction."""
    instruction = "Find the photo. " * 20_000  # 320,000 characters
    with pytest.warns(TextTruncatedWarning):  # the server's batcher thread warns too
        status, body = post(server, "/v1/embeddings", {"model": MODEL, "input": ["boats"], "instruction": instruction})
    assert status == 200
    with pytest.warns(TextTruncatedWarning):
        expected = tiny_composed.encode(["boats"], instruction=instruction)[0]
    np.testing.assert_allclose(body["data"][0]["embedding"], expected, atol=1e-5)


def test_rerank_uses_the_reranker_when_there_is_one(server):
    status, body = post(server, "/v1/rerank", {"model": MODEL, "query": "a dog",
                                               "documents": ["first", "second", {"text": "third"}], "top_n": 2})
    assert status == 200 and body["scorer"] == "reranker"
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [(2, 2.0), (1, 1.0)]
    assert body["results"][0]["document"] == {"text": "third"} and body["usage"]["total_tokens"] > 0


def test_rerank_falls_back_to_embedding_cosine_and_says_so(plain_server, tiny_composed):
    documents = ["a cat asleep", "a dog running", "a city at night"]
    status, body = post(plain_server, "/v1/rerank", {"query": "a dog", "documents": documents})
    assert status == 200 and body["scorer"] == "embedding-cosine"
    cosine = tiny_composed.encode(documents, role="candidate") @ tiny_composed.encode(["a dog"])[0]
    assert [r["index"] for r in body["results"]] == list(np.argsort(-cosine))
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], np.sort(cosine)[::-1], atol=1e-5)


def test_search_text_image_thumbnails_and_rerank(server, plain_server, store, tiny_composed):
    status, body = post(server, "/v1/search", {"query": "a photo of a boat", "k": 4})
    assert status == 200 and body["reranked"] is False
    expected = retrieve(store, embed_query(tiny_composed, query_input("a photo of a boat", None)), 4)
    assert [(r["path"], r["page"]) for r in body["results"]] == [(h.path, h.page) for h in expected]
    np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in expected], atol=1e-5)

    image = make_image(64, 48, seed=12)  # the content of photo_2.png
    status, body = post(server, "/v1/search", {"image": data_url(image), "query": "this", "k": 6,
                                               "thumbnails": True})
    assert status == 200 and len(body["results"]) == 6
    assert all(r["thumbnail"].startswith("data:image/jpeg;base64,") for r in body["results"])
    assert {r["kind"] for r in body["results"]} == {"image", "pdf"}

    status, plain = post(server, "/v1/search", {"query": "a boat", "k": 6})
    status, reranked = post(server, "/v1/search", {"query": "a boat", "k": 6, "rerank": True})
    assert status == 200 and reranked["reranked"] is True
    # the fake reranker prefers the embedder's last candidates: the top 6 come back reversed
    assert [r["path"] for r in reranked["results"]] == [r["path"] for r in plain["results"]][::-1]

    status, body = post(plain_server, "/v1/search", {"query": "a boat", "rerank": True})
    assert status == 400 and body["error"]["code"] == "rerank_unavailable"
    assert "not available" in body["error"]["message"]


def test_health_and_page(server, store):
    status, body = request(server, "GET", "/health")
    assert status == 200 and body["model"] == MODEL and body["index"]["rows"] == store.count() == 6
    assert (body["device"], body["dtype"]) == ("cpu", "float32")
    conn = http.client.HTTPConnection(server.split("//")[1].split(":")[0], int(server.rsplit(":", 1)[1]))
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and b'id="drop"' in page.read()


def test_remote_image_urls_are_fetched_only_when_allowed(plain_server, guarded, tiny_composed):
    image = make_image(40, 30, seed=5)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    png = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        hits = 0

        def do_GET(self):  # noqa: N802
            Handler.hits += 1
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    origin = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{origin.server_address[1]}/cat.png"
    try:
        body = {"input": [[{"type": "image_url", "image_url": {"url": url}}]]}
        status, refused = post(guarded, "/v1/embeddings", body, headers=AUTH)
        assert status == 400 and refused["error"]["code"] == "remote_images_disabled" and Handler.hits == 0
        status, fetched = post(plain_server, "/v1/embeddings", body)
        assert status == 200 and Handler.hits == 1
        np.testing.assert_allclose(fetched["data"][0]["embedding"], tiny_composed.encode([image])[0], atol=1e-5)
    finally:
        origin.shutdown()


def test_auth_with_the_openai_client(guarded, tiny_composed):
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=MODEL, input="hello")
    ok = openai.OpenAI(base_url=guarded + "/v1", api_key="s3cret", max_retries=0).embeddings.create(
        model=MODEL, input="hello")
    np.testing.assert_allclose(ok.data[0].embedding, tiny_composed.encode(["hello"])[0], atol=1e-5)


def big_noise_png(pixels_side: int) -> str:
    rng = np.random.default_rng(0)
    from PIL import Image

    return data_url(Image.fromarray(rng.integers(0, 256, (pixels_side, pixels_side, 3), dtype=np.uint8)))


def flat_png(width: int, height: int) -> str:
    from PIL import Image

    return data_url(Image.new("RGB", (width, height), (120, 30, 200)))


def image_input(url: str) -> dict:
    return {"input": [[{"type": "image_url", "image_url": {"url": url}}]]}


BAD_REQUESTS = [
    # (name, method, path, body, raw bytes, extra headers, status, code or message fragment)
    ("no key", "POST", "/v1/embeddings", {"input": "x"}, None, {"Authorization": ""}, 401, "invalid_api_key"),
    ("wrong key", "POST", "/v1/search", {"query": "x"}, None, {"Authorization": "Bearer nope"}, 401, "wrong API key"),
    ("not json", "POST", "/v1/embeddings", None, b"{not json", {}, 400, "invalid_json"),
    ("not an object", "POST", "/v1/embeddings", ["x"], None, {}, 400, "invalid_json"),
    # 100,000 levels (200 kB, under the body cap): the decoder's RecursionError used to be a 500
    ("deep arrays", "POST", "/v1/embeddings", None, b"[" * 100_000 + b"]" * 100_000, {}, 400, "json_too_deep"),
    ("deep objects", "POST", "/v1/search", None, b'{"a":' * 40_000 + b"1" + b"}" * 40_000, {}, 400,
     "json_too_deep"),
    ("deep input", "POST", "/v1/rerank", None, b'{"query": "a", "documents": ' + b"[" * 100_000, {}, 400,
     "json_too_deep"),
    ("missing input", "POST", "/v1/embeddings", {"model": MODEL}, None, {}, 400, "input: missing"),
    ("empty text", "POST", "/v1/embeddings", {"input": ["ok", " "]}, None, {}, 400, "input[1]: the text is empty"),
    ("token ids", "POST", "/v1/embeddings", {"input": [[1, 2, 3]]}, None, {}, 400, "token-id inputs"),
    ("unknown model", "POST", "/v1/embeddings", {"model": "gpt-x", "input": "a"}, None, {}, 400, "model_not_found"),
    ("dimensions", "POST", "/v1/embeddings", {"input": "a", "dimensions": 65}, None, {}, 400, "from 1 to 64"),
    ("encoding", "POST", "/v1/embeddings", {"input": "a", "encoding_format": "int8"}, None, {}, 400,
     "encoding_format"),
    ("role", "POST", "/v1/embeddings", {"input": "a", "role": "doc"}, None, {}, 400, "role"),
    ("too many inputs", "POST", "/v1/embeddings", {"input": ["a"] * 9}, None, {}, 413, "too_many_inputs"),
    ("part type", "POST", "/v1/embeddings", {"input": [[{"type": "audio"}]]}, None, {}, 400, "not supported"),
    ("server path", "POST", "/v1/embeddings", image_input("/etc/passwd"), None, {}, 400, "server_paths_refused"),
    ("file url", "POST", "/v1/embeddings", image_input("file:///etc/hosts"), None, {}, 400, "server_paths_refused"),
    ("remote url", "POST", "/v1/embeddings", image_input("http://127.0.0.1:9/x.png"), None, {}, 400,
     "remote_images_disabled"),
    ("bad base64", "POST", "/v1/embeddings", image_input("data:image/png;base64,@@@@"), None, {}, 400,
     "not valid base64"),
    ("not an image", "POST", "/v1/embeddings", image_input("data:image/png;base64," +
                                                           base64.b64encode(b"hello world").decode()),
     None, {}, 400, "bad_image"),
    ("image bytes", "POST", "/v1/embeddings", image_input(big_noise_png(200)), None, {}, 413, "image_too_large"),
    ("image pixels", "POST", "/v1/embeddings", image_input(flat_png(600, 600)), None, {}, 413,
     "image_too_many_pixels"),
    ("body size", "POST", "/v1/embeddings", {"input": ["x" * 400_000]}, None, {}, 413, "body_too_large"),
    ("search empty", "POST", "/v1/search", {"query": " "}, None, {}, 400, "empty search"),
    ("search k", "POST", "/v1/search", {"query": "a", "k": 21}, None, {}, 400, "from 1 to 20"),
    ("search image path", "POST", "/v1/search", {"image": "../db.lance"}, None, {}, 400, "server_paths_refused"),
    ("search rerank flag", "POST", "/v1/search", {"query": "a", "rerank": "yes"}, None, {}, 400, "true or false"),
    ("rerank no documents", "POST", "/v1/rerank", {"query": "a", "documents": []}, None, {}, 400, "documents"),
    ("rerank top_n", "POST", "/v1/rerank", {"query": "a", "documents": ["b"], "top_n": 0}, None, {}, 400, "top_n"),
    ("rerank bad query", "POST", "/v1/rerank", {"query": 3, "documents": ["b"]}, None, {}, 400, "query"),
    ("no endpoint", "POST", "/v1/files", {}, None, {}, 404, "not_found"),
    ("wrong method", "GET", "/v1/embeddings", None, None, {}, 405, "not allowed"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_json_error_naming_the_problem(guarded, case):
    name, method, path, body, raw, headers, status, expected = case
    status_got, answer = request(guarded, method, path, body, headers={**AUTH, **headers}, raw=raw)
    assert status_got == status, answer
    error = answer["error"]
    assert expected in (error["code"] or "") or expected in error["message"], error
    assert "Traceback" not in error["message"]


def test_chunked_body_over_the_cap_is_refused(guarded):
    host, port = guarded.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def chunks():
        yield b'{"input": ["'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"]}'

    conn.request("POST", "/v1/embeddings", body=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and b"body_too_large" in response.read()


def test_health_needs_no_key_but_reports_auth(guarded):
    status, body = request(guarded, "GET", "/health")
    assert status == 200 and body["auth"] is True


def test_serve_command_refuses_a_missing_index(run_cli, tmp_path):
    code, _, err = run_cli("serve", "--db", tmp_path / "nothing.lance", "--port", "0")
    assert code == 2 and "no index there" in err


def test_serve_command_refuses_zero_image_workers(run_cli):
    code, _, err = run_cli("serve", "--image-workers", "0", "--port", "0")
    assert code == 2 and "--image-workers" in err
