"""FusionReranker: first-stage score + weight × the cosine of a second, independently trained dual
encoder (the shipped one: frozen EfficientNet-Lite0 + MiniLM with trained heads), on a few flickr
photos.  The dual encoder's cosines are computed here independently, with ``DualEncoder.encode``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_image
from serve_helpers import MODEL, build_index, data_url, post

from magic_mm.errors import BadInputError, ModelFolderError
from magic_mm.index.files import page_image
from magic_mm.index.indexer import index_paths
from magic_mm.index.search import RerankerUnavailableError, load_reranker, reranker_scores
from magic_mm.index.store import ModelStamp, PageStore
from magic_mm.model.config import DEFAULT_MODEL_FOLDER
from magic_mm.model.fusion_reranker import FUSION_FILE, FusionReranker
from magic_mm.model.inputs import MMInput
from magic_mm.model.reranker import RerankHit

pytestmark = pytest.mark.real_weights

SHIPPED = DEFAULT_MODEL_FOLDER / "fusion_reranker"
SCRIPT = REPO / ".venv" / "bin" / "magic-mm"


@pytest.fixture(scope="module")
def shipped() -> FusionReranker:
    """magic-mm-tiny's reranker, loaded the way search and the server load it."""
    reranker = load_reranker("magic-mm-tiny")
    assert isinstance(reranker, FusionReranker)
    return reranker


@pytest.fixture(scope="module")
def photos(flickr_dir: Path) -> dict:
    """Three test photos, the first one's caption as the query, and the dual encoder's own cosines."""
    from magic_mm.data.captions import read_captioned_images

    items = read_captioned_images(flickr_dir, "test")[:3]
    return {"paths": [i.path for i in items], "caption": items[0].captions[0]}


@pytest.fixture(scope="module")
def dual_cos(shipped: FusionReranker, photos: dict) -> np.ndarray:
    dual = shipped.dual
    return dual.encode(photos["paths"], role="candidate") @ dual.encode([photos["caption"]], role="query")[0]


def test_weight_zero_keeps_the_first_stage_order_and_a_large_weight_the_dual_encoders(shipped, photos, dual_cos):
    assert len(set(np.round(dual_cos, 6))) == len(dual_cos)  # distinct cosines: the dual order is defined
    dual_order = list(np.argsort(-dual_cos))
    # first-stage scores that rank the photos in the reverse of the dual encoder's order
    first = np.empty(len(dual_cos))
    first[dual_order] = 0.01 * np.arange(len(dual_cos))
    first_order = list(np.argsort(-first))
    assert first_order == dual_order[::-1]
    paths = photos["paths"]
    zero = FusionReranker(shipped.dual, 0.0).rerank(photos["caption"], paths, top_k=3, first_stage_scores=first)
    assert [h.index for h in zero] == first_order
    assert [h.score for h in zero] == pytest.approx(first[first_order].tolist(), abs=1e-12)
    large = FusionReranker(shipped.dual, 1e4).rerank(photos["caption"], paths, top_k=3, first_stage_scores=first)
    assert [h.index for h in large] == dual_order


def test_fused_score_is_first_stage_plus_weight_times_the_dual_cosine(shipped, photos, dual_cos):
    first = [0.12, 0.31, 0.2]
    # top_k=2 reranks the head only (the first two candidates), with the head's first-stage scores
    hits = shipped.rerank(photos["caption"], photos["paths"], top_k=2, first_stage_scores=first)
    assert all(isinstance(h, RerankHit) for h in hits) and sorted(h.index for h in hits) == [0, 1]
    expected = np.array(first) + shipped.weight * dual_cos
    assert {h.index: h.score for h in hits} == pytest.approx({i: expected[i] for i in (0, 1)}, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_pairs_the_dual_encoder_cannot_score_keep_their_first_stage_score(shipped, photos, dual_cos):
    path = photos["paths"][0]
    # an image query: no dual-encoder score for any candidate, so the first-stage order and scores stay
    first = [0.1, 0.5, 0.3]
    hits = shipped.rerank(path, ["a dog runs", photos["paths"][1], (photos["paths"][2], "a caption")], top_k=3,
                          first_stage_scores=first)
    assert [(h.index, h.score) for h in hits] == [(1, 0.5), (2, 0.3), (0, 0.1)]
    assert np.isnan(shipped.dual_scores(path, [photos["paths"][1], "a dog runs"])).all()
    # a text query: only the image-only candidate is fused; a text and an image+text candidate are not
    candidates = ["a text candidate", MMInput(image=path, text="with a caption"), MMInput(image=path)]
    scores = shipped.score(photos["caption"], candidates, first_stage_scores=first)
    assert scores[:2] == [0.1, 0.5]
    assert scores[2] == pytest.approx(0.3 + shipped.weight * dual_cos[0], abs=1e-5)


def test_first_stage_scores_come_from_the_embedder_or_a_clear_error(shipped, photos, dual_cos, tiny_composed):
    with pytest.raises(BadInputError, match="needs the first stage's scores: pass first_stage_scores"):
        shipped.rerank(photos["caption"], photos["paths"], top_k=3)
    with pytest.raises(BadInputError, match="2 scores for 3 candidates"):
        shipped.rerank(photos["caption"], photos["paths"], top_k=3, first_stage_scores=[0.1, 0.2])
    with_embedder = FusionReranker(shipped.dual, shipped.weight, embedder=tiny_composed)
    hits = with_embedder.rerank(photos["caption"], photos["paths"], top_k=3)
    cosine = tiny_composed.encode(photos["paths"], role="candidate") @ tiny_composed.encode(
        [photos["caption"]], role="query")[0]
    expected = cosine + shipped.weight * dual_cos
    assert {h.index: h.score for h in hits} == pytest.approx(dict(enumerate(expected)), abs=1e-5)
    assert [h.index for h in hits] == list(np.argsort(-expected))


def test_bad_folders_raise_model_folder_errors_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match=f"{empty}: not a fusion-reranker folder .*benchmarks/fusion_reranker.py"):
        FusionReranker.from_pretrained(empty)
    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED, broken)
    (broken / FUSION_FILE).write_text("{not json")
    with pytest.raises(ModelFolderError, match=f"{broken / FUSION_FILE}: not valid JSON"):
        FusionReranker.from_pretrained(broken)
    (broken / FUSION_FILE).write_text(json.dumps({"format": "magic-mm-fusion-reranker", "weight": "high"}))
    with pytest.raises(ModelFolderError, match="\"weight\" must be a finite number, got 'high'"):
        FusionReranker.from_pretrained(broken)
    headless = tmp_path / "headless"
    shutil.copytree(SHIPPED, headless)
    (headless / "heads.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=f"{headless}: the dual encoder's heads.safetensors is missing"):
        FusionReranker.from_pretrained(headless)
    with pytest.raises(RerankerUnavailableError, match="reranking is not available .*heads.safetensors is missing"):
        load_reranker(str(headless))


def test_save_and_load_keep_the_weight_and_the_scores(shipped, photos, tmp_path):
    original = FusionReranker(shipped.dual, 0.37, {"split": "val", "note": "test"})
    first, candidates = [0.2, 0.25], [photos["paths"][0], "a text candidate"]
    before = original.score(photos["caption"], candidates, first_stage_scores=first)
    assert before[0] != first[0] and before[1] == first[1]
    original.save_pretrained(tmp_path / "fusion")
    assert {p.name for p in (tmp_path / "fusion").iterdir()} == {FUSION_FILE, "dual_encoder.json", "heads.safetensors"}
    loaded = load_reranker(str(tmp_path / "fusion"))  # dispatched on fusion_reranker.json
    assert isinstance(loaded, FusionReranker)
    assert loaded.weight == 0.37 and loaded.selection == {"split": "val", "note": "test"}
    assert loaded.score(photos["caption"], candidates, first_stage_scores=first) == pytest.approx(before, abs=1e-6)


def test_shipped_folder_says_which_weight_and_how_it_was_chosen(shipped):
    spec = json.loads((SHIPPED / FUSION_FILE).read_text())
    assert spec["format"] == "magic-mm-fusion-reranker" and spec["weight"] == shipped.weight > 0
    selection = spec["selection"]
    assert selection["split"] == "val" and selection["top"] == 5 and selection["chosen_weight"] == spec["weight"]
    by_weight = {float(w): r for w, r in selection["val_r1_by_weight"].items()}
    best = max(by_weight.values())
    assert by_weight[spec["weight"]] == best == selection["val_r1"]
    assert spec["weight"] == min(w for w, r in by_weight.items() if r == best)  # ties → the smaller weight
    assert best > by_weight[0.0] == selection["val_r1_embedder_alone"]
    # the paper-style MLLM reranker stays beside it (MagicReranker.from_pretrained("magic-mm-tiny")
    # loads it: tests/test_real_model.py)
    assert (DEFAULT_MODEL_FOLDER / "reranker" / "reranker.json").is_file()


class RecordingReranker:
    """Takes first-stage scores, like FusionReranker; answers them back."""

    def __init__(self) -> None:
        self.seen = None

    def rerank(self, query, candidates, top_k=5, first_stage_scores=None):
        self.seen = first_stage_scores
        return [RerankHit(i, -s) for i, s in enumerate(first_stage_scores)]


def test_the_search_adapter_passes_first_stage_scores_only_to_rerankers_that_take_them():
    recording = RecordingReranker()
    assert reranker_scores(recording, MMInput(text="q"), [MMInput(text="a"), MMInput(text="b")], [0.5, 0.25]) \
        == [-0.5, -0.25]
    assert recording.seen == [0.5, 0.25]

    class Plain:
        def rerank(self, query, candidates, top_k=5):
            return np.arange(len(candidates), dtype=np.float64)

    assert reranker_scores(Plain(), MMInput(text="q"), [MMInput(text="a"), MMInput(text="b")], [0.5, 0.25]) == [0, 1]


def test_cli_search_rerank_uses_the_shipped_fusion_reranker(default_model, shipped, photos, tmp_path):
    docs = tmp_path / "photos"
    docs.mkdir()
    for path in photos["paths"][:2]:
        shutil.copy(path, docs / path.name)
    db = tmp_path / "flickr.lance"
    index_paths(default_model, PageStore.open_or_create(db, ModelStamp.of(default_model, "magic-mm-tiny")), [docs])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(SCRIPT), "search", photos["caption"], "--db", str(db), "--k", "2", "--rerank", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    results = out["results"]
    assert out["reranked"] is True and [r["rank"] for r in results] == [1, 2]
    dual = shipped.dual
    cosine = dual.encode([Path(r["path"]) for r in results], role="candidate") @ dual.encode(
        [photos["caption"]], role="query")[0]
    for r, c in zip(results, cosine):
        assert r["rerank_score"] == r["score"] == pytest.approx(r["embedding_score"] + shipped.weight * c, abs=1e-4)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


@pytest.fixture(scope="module")
def fusion_server(tiny_composed, shipped, tmp_path_factory):
    from magic_mm.serve.app import create_app
    from magic_mm.serve.limits import ServeSettings
    from magic_mm.serve.runner import ServerThread

    store = build_index(tiny_composed, tmp_path_factory.mktemp("fusion-serve"))
    app = create_app(tiny_composed, MODEL, store, ServeSettings(rerank_top=3), reranker_loader=lambda model: shipped)
    with ServerThread(app) as running:
        yield running.url


def test_server_rerank_and_search_with_the_fusion_reranker(fusion_server, tiny_composed, shipped):
    images = [make_image(64, 48, seed=40 + i) for i in range(2)]
    documents = [{"image": data_url(image)} for image in images] + ["a text document"]
    status, body = post(fusion_server, "/v1/rerank", {"query": "a dog", "documents": documents})
    assert status == 200 and body["scorer"] == "reranker"
    # first stage: the service's embedder (cosine); the image documents add w × the dual encoder's cosine
    cosine = tiny_composed.encode([*images, "a text document"], role="candidate") @ tiny_composed.encode(["a dog"])[0]
    dual = shipped.dual.encode(images, role="candidate") @ shipped.dual.encode(["a dog"], role="query")[0]
    expected = cosine + shipped.weight * np.append(dual, 0.0)
    assert {r["index"]: r["relevance_score"] for r in body["results"]} == pytest.approx(dict(enumerate(expected)),
                                                                                          abs=1e-5)
    status, found = post(fusion_server, "/v1/search", {"query": "a boat", "k": 4, "rerank": True})
    assert status == 200 and found["reranked"] is True
    head = found["results"][:3]  # rerank_top=3: the embedder's top 3 (photos and PDF pages), fused and reordered
    assert found["results"][3]["rerank_score"] is None
    pages = [page_image(Path(r["path"]), r["kind"], r["page"]) for r in head]
    dual = shipped.dual.encode(pages, role="candidate") @ shipped.dual.encode(["a boat"], role="query")[0]
    for r, c in zip(head, dual):
        assert r["rerank_score"] == r["score"] == pytest.approx(r["embedding_score"] + shipped.weight * c, abs=1e-5)
    assert [r["score"] for r in head] == sorted((r["score"] for r in head), reverse=True)
