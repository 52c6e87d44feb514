import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_image

TINY = ["--model", "tiny-random-composed"]


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        make_image(80, 60, seed=i).save(p)
        paths.append(p)
    return paths


def test_info_json(run_cli):
    code, out, _ = run_cli("info", "--json", *TINY, "--compression", "bilinear:2")
    assert code == 0
    data = json.loads(out)
    assert data["family"] == "composed"
    assert data["visual_tokens"] == {"none": 16, "bilinear:2": 4}  # 128 px → 4×4 grid in the tiny config


def test_embed_images_to_npy_matches_api(run_cli, images, tmp_path, tiny_composed):
    out = tmp_path / "x.npy"
    code, stdout, _ = run_cli("embed", *images, "--out", out, *TINY, "--json", "--quiet")
    assert code == 0, stdout
    matrix = np.load(out)
    assert matrix.shape == (3, tiny_composed.embedding_dim)
    np.testing.assert_allclose(matrix, tiny_composed.encode(images, role="candidate"), atol=1e-5)
    sidecar = json.loads((tmp_path / "x.npy.json").read_text())
    assert [r["input"] for r in sidecar["rows"]] == [str(p) for p in images]
    assert json.loads(stdout)["rows"] == 3


def test_embed_pairs_and_texts_to_parquet(run_cli, images, tmp_path, tiny_composed):
    out = tmp_path / "x.parquet"
    code, _, err = run_cli("embed", *images[:2], "--text", "one", "--text", "two", "--out", out, *TINY, "-q")
    assert code == 0, err
    table = pq.read_table(out)
    assert table.column("text").to_pylist() == ["one", "two"]
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    expected = tiny_composed.encode([(images[0], "one"), (images[1], "two")], role="candidate")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_bad_file_stops_the_run_with_its_name(run_cli, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "x.npy"
    code, _, err = run_cli("embed", images[0], bad, images[1], "--out", out, *TINY, "-q")
    assert code == 2
    assert "bad.jpg" in err and "--skip-bad" in err and "Traceback" not in err
    assert not out.exists()


def test_skip_bad_reports_and_keeps_rows_aligned(run_cli, images, tmp_path, tiny_composed):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    out = tmp_path / "x.npy"
    code, stdout, _ = run_cli("embed", images[0], bad, images[1], "--out", out, *TINY, "--skip-bad", "--json", "-q")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["rows"] == 2 and "bad.jpg" in summary["skipped"][0]["input"]
    rows = json.loads((tmp_path / "x.npy.json").read_text())["rows"]
    assert [r["input"] for r in rows] == [str(images[0]), str(images[1])]
    np.testing.assert_allclose(np.load(out), tiny_composed.encode([images[0], images[1]], role="candidate"), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "--out", "x.npy"], "nothing to embed"),
        (["embed", "--text", "a", "--out", "x.txt"], "use a .npy or .parquet"),
        (["embed", "--text", "", "--out", "x.npy"], "the text is empty"),
        (["info", "--model", "/definitely/not/here"], "no such model folder"),
        (["info", "--compression", "bilinear:zero"], "bad compression argument"),
        (["info", "--image-size", "big"], "WIDTHxHEIGHT"),
    ],
)
def test_user_errors_exit_2_without_traceback(run_cli, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = TINY if "--model" not in args else []
    code, _, err = run_cli(*args, *extra)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_mismatched_file_and_text_counts(run_cli, images, tmp_path):
    code, _, err = run_cli("embed", *images, "--text", "only one", "--out", tmp_path / "x.npy", *TINY)
    assert code == 2 and "3 files and 1 --text" in err


def test_demo_json_on_a_small_folder(run_cli, tmp_path):
    (tmp_path / "images").mkdir()
    rows, splits = ["image,caption"], ["image,split"]
    for i in range(4):
        make_image(64, 64, seed=i).save(tmp_path / "images" / f"p{i}.jpg")
        rows += [f"p{i}.jpg,caption {i} a", f"p{i}.jpg,caption {i} b"]
        splits.append(f"p{i}.jpg,val")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "splits.csv").write_text("\n".join(splits) + "\n")
    code, out, err = run_cli("demo", "--data", tmp_path, "--queries", "2", "--k", "2", "--json", *TINY)
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 4 and result["captions"] == 8
    assert len(result["examples"]) == 2 and len(result["examples"][0]["top"]) == 2
    assert 0.0 <= result["text_to_image"]["recall@1"] <= result["text_to_image"]["recall@5"] <= 1.0
    assert result["text_to_image"]["recall@5"] == 1.0  # only 4 images: the truth is always in the top 5
