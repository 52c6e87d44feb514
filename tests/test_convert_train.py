"""Converters to the MMEB-train layout (``magic-mm convert train-*``), the caption-agreement
label set (``convert caption-labels``), ImageNet pseudo-labels (``convert imagenet-labels``)
and the default model's mixture.  Commands run through the installed script in a
subprocess, as a user's shell runs them; the files they write are read back with the
training reader (``magic_mm.data.train_layout``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from magic_mm.data.mmeb import read_task
from magic_mm.data.train_layout import SubDataset, guess_kind, open_subdataset

from conftest import REPO, make_image

SCRIPT = REPO / ".venv" / "bin" / "magic-mm"


def cli(*args: object) -> subprocess.CompletedProcess:
    """``magic-mm ARGS`` as a user's shell runs it."""
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def ok_json(*args: object) -> dict:
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def user_error(*args: object) -> str:
    """Run a command that must fail as a user error: exit 2, a message, no traceback."""
    result = cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())  # rich wraps long lines


def rows(path: Path, image_root: Path) -> list:
    return list(open_subdataset(SubDataset(file=str(path), image_root=str(image_root))))


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def caption_folder(tmp_path: Path) -> Path:
    """p0 (3 captions) and p1 (2) in train, p2 (1) in test; JPEG images."""
    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    for n in range(3):
        make_image(48, 32, seed=n).save(root / "images" / f"p{n}.jpg")
    write_csv(root / "captions.csv", "image,caption\n" + "".join(
        f"p{n}.jpg,cap {n}.{k}\n" for n, count in enumerate((3, 2, 1)) for k in range(count)))
    write_csv(root / "splits.csv", "image,split\np0.jpg,train\np1.jpg,train\np2.jpg,test\n")
    return root


# -- train-captions ---------------------------------------------------------------------------


def test_train_captions_three_directions(caption_folder, tmp_path):
    images = caption_folder / "images"
    t2i = ok_json("convert", "train-captions", caption_folder, "--split", "train", "--direction", "t2i",
                  "--out", tmp_path / "t2i.jsonl")
    assert (t2i["rows"], t2i["kind"], t2i["rows_with_negative"]) == (5, "t2i", 0)
    assert t2i["mixture_entry"]["query_instruction"] == "Find me an everyday image that matches the given query."
    assert t2i["mixture_entry"]["image_root"] == str(images)
    got = [(r.query.text, r.positive.image.name) for r in rows(tmp_path / "t2i.jsonl", images)]
    assert got == [("cap 0.0", "p0.jpg"), ("cap 0.1", "p0.jpg"), ("cap 0.2", "p0.jpg"),
                   ("cap 1.0", "p1.jpg"), ("cap 1.1", "p1.jpg")]

    # i2t and t2t: one row per photo; photo n uses caption n mod k (and the next one for t2t).
    ok_json("convert", "train-captions", caption_folder, "--split", "train", "--direction", "i2t",
            "--out", tmp_path / "i2t.parquet")
    got = [(r.query.image.name, r.query.text, r.positive.text) for r in rows(tmp_path / "i2t.parquet", images)]
    assert got == [("p0.jpg", None, "cap 0.0"), ("p1.jpg", None, "cap 1.1")]
    t2t = ok_json("convert", "train-captions", caption_folder, "--direction", "t2t", "--out", tmp_path / "t2t.jsonl")
    got = [(r.query.text, r.positive.text) for r in rows(tmp_path / "t2t.jsonl", images)]
    assert got == [("cap 0.0", "cap 0.1"), ("cap 1.1", "cap 1.0")]  # p2 has one caption: no pair
    assert t2t["images"] == 3

    # The same input writes the same bytes.
    first = (tmp_path / "t2t.jsonl").read_bytes()
    ok_json("convert", "train-captions", caption_folder, "--direction", "t2t", "--out", tmp_path / "t2t.jsonl")
    assert (tmp_path / "t2t.jsonl").read_bytes() == first


# -- train-labels -----------------------------------------------------------------------------


def test_train_labels_negatives_are_other_labels(tmp_path, image_dir):
    labels = write_csv(tmp_path / "labels.csv", "image,label,score\n" + "".join(
        f"i{n % 4}.png,{name},0.5\n" for n, name in enumerate(["cat", "dog", "bird", "fish"] * 5)))
    out = ok_json("convert", "train-labels", labels, "--image-root", image_dir, "--out", tmp_path / "cls.jsonl")
    assert (out["rows"], out["rows_with_negative"], out["labels"]) == (20, 20, 4)
    assert out["mixture_entry"]["query_instruction"] == "Represent the given image for classification."
    got = rows(tmp_path / "cls.jsonl", image_dir)
    assert [r.positive.text for r in got] == ["cat", "dog", "bird", "fish"] * 5
    assert all(r.query.image is not None and r.query.text is None for r in got)
    negatives = [r.negatives[0].text for r in got]
    assert all(neg != r.positive.text and neg in {"cat", "dog", "bird", "fish"} for neg, r in zip(negatives, got))
    assert len(set(negatives)) == 4  # drawn from every other label, not always the same one
    first = (tmp_path / "cls.jsonl").read_bytes()
    ok_json("convert", "train-labels", labels, "--image-root", image_dir, "--out", tmp_path / "cls.jsonl")
    assert (tmp_path / "cls.jsonl").read_bytes() == first
    ok_json("convert", "train-labels", labels, "--image-root", image_dir, "--seed", "1", "--out", tmp_path / "s1.jsonl")
    assert [r.negatives[0].text for r in rows(tmp_path / "s1.jsonl", image_dir)] != negatives


# -- train-vqa --------------------------------------------------------------------------------


def test_train_vqa(tmp_path, image_dir):
    qa = write_csv(tmp_path / "qa.csv", 'image,question,answer\ni0.png,What colour is it?,red\n'
                                        'i1.png,"How many, roughly?",three\n')
    out = ok_json("convert", "train-vqa", qa, "--image-root", image_dir, "--out", tmp_path / "vqa.parquet")
    assert out["kind"] == "vqa" and out["rows"] == 2
    got = rows(tmp_path / "vqa.parquet", image_dir)
    assert [(r.query.image.name, r.query.text, r.positive.text) for r in got] == [
        ("i0.png", "What colour is it?", "red"), ("i1.png", "How many, roughly?", "three")]
    assert guess_kind(got[0]) == "instruction"  # stage 1 reads image + question → answer


# -- train-pdf --------------------------------------------------------------------------------


def make_pdf(path: Path, sizes: list[tuple[float, float]]) -> Path:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    for width, height in sizes:
        pdf.new_page(width, height).close()
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.save(str(path))
    pdf.close()
    return path


@pytest.fixture
def pdf_folder(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    make_pdf(root / "report.pdf", [(200, 300), (300, 200)])  # portrait, then landscape
    make_pdf(root / "sub" / "memo.pdf", [(100, 100)])
    return root


def test_train_pdf_renders_each_page_once(tmp_path, pdf_folder):
    queries = write_csv(tmp_path / "queries.csv", "pdf,page,query\nreport.pdf,1,revenue in 2024\n"
                        "report.pdf,2,the org chart\nsub/memo.pdf,1,who approved it\nreport.pdf,1,total revenue\n")
    out = ok_json("convert", "train-pdf", queries, "--pdf-root", pdf_folder, "--out", tmp_path / "doc.jsonl")
    pages = tmp_path / "doc-pages"
    assert (out["rows"], out["pdfs"], out["pages"], out["kind"]) == (4, 2, 3, "document")
    assert out["mixture_entry"]["image_root"] == str(pages)
    assert sorted(p.relative_to(pages).as_posix() for p in pages.rglob("*.png")) == [
        "report/page-0001.png", "report/page-0002.png", "sub/memo/page-0001.png"]
    with Image.open(pages / "report" / "page-0001.png") as first, Image.open(pages / "report" / "page-0002.png") as second:
        assert first.height == 1024 and first.width < first.height  # the indexer's long side, portrait
        assert second.width == 1024 and second.height < second.width
    got = rows(tmp_path / "doc.jsonl", pages)
    assert [(r.query.text, r.positive.image.relative_to(pages).as_posix()) for r in got] == [
        ("revenue in 2024", "report/page-0001.png"), ("the org chart", "report/page-0002.png"),
        ("who approved it", "sub/memo/page-0001.png"), ("total revenue", "report/page-0001.png")]


def test_train_pdf_bad_inputs(tmp_path, pdf_folder):
    past_end = write_csv(tmp_path / "a.csv", "pdf,page,query\nreport.pdf,1,ok\nreport.pdf,5,too far\n")
    message = user_error("convert", "train-pdf", past_end, "--pdf-root", pdf_folder, "--out", tmp_path / "a.jsonl")
    assert "a.csv, line 3" in message and "has no page 5" in message
    bad_page = write_csv(tmp_path / "b.csv", "pdf,page,query\nreport.pdf,first,q\n")
    message = user_error("convert", "train-pdf", bad_page, "--pdf-root", pdf_folder, "--out", tmp_path / "b.jsonl")
    assert "line 2: page 'first' is not a page number" in message
    (pdf_folder / "broken.pdf").write_bytes(b"this is not a PDF")
    broken = write_csv(tmp_path / "c.csv", "pdf,page,query\nbroken.pdf,1,q\n")
    message = user_error("convert", "train-pdf", broken, "--pdf-root", pdf_folder, "--out", tmp_path / "c.jsonl")
    assert "broken.pdf: cannot open the PDF" in message and "repair or remove it" in message
    missing = write_csv(tmp_path / "d.csv", "pdf,page,query\nreport.pdf,1,q\nnowhere.pdf,1,q\n")
    message = user_error("convert", "train-pdf", missing, "--pdf-root", pdf_folder, "--out", tmp_path / "d.jsonl")
    assert "1 PDF(s) not found" in message and "nowhere.pdf (d.csv, line 3)" in message and "--pdf-root" in message
    assert not (tmp_path / "d.jsonl").exists()


# -- bad inputs, as the user meets them -------------------------------------------------------


def test_bad_inputs_name_the_input_and_the_fix(tmp_path, image_dir, caption_folder):
    out = tmp_path / "out.jsonl"
    message = user_error("convert", "train-captions", tmp_path / "no-such-folder", "--out", out)
    assert "no-such-folder: image–caption folder not found" in message

    empty = write_csv(tmp_path / "empty.csv", "")
    message = user_error("convert", "train-vqa", empty, "--image-root", image_dir, "--out", out)
    assert "empty.csv: the CSV is empty; write a header line image,question,answer" in message
    header_only = write_csv(tmp_path / "header.csv", "image,label\n")
    message = user_error("convert", "train-labels", header_only, "--image-root", image_dir, "--out", out)
    assert "header.csv: the CSV has a header but no rows" in message
    unknown = write_csv(tmp_path / "unknown.csv", "image,label,colour\ni0.png,cat,red\ni1.png,dog,blue\n")
    message = user_error("convert", "train-labels", unknown, "--image-root", image_dir, "--out", out)
    assert "unknown column(s) colour; the columns are image, label, score" in message
    wrong = write_csv(tmp_path / "wrong.csv", "img,question,answer\ni0.png,q,a\n")
    message = user_error("convert", "train-vqa", wrong, "--image-root", image_dir, "--out", out)
    assert "needs the columns image,question,answer; found ['img', 'question', 'answer']" in message
    blank = write_csv(tmp_path / "blank.csv", "image,question,answer\ni0.png,q,a\ni1.png,,a\n")
    message = user_error("convert", "train-vqa", blank, "--image-root", image_dir, "--out", out)
    assert "empty image, question or answer on line(s) 3" in message

    missing = write_csv(tmp_path / "missing.csv", "image,label\ni0.png,cat\nghost.png,dog\ni1.png,dog\n")
    message = user_error("convert", "train-labels", missing, "--image-root", image_dir, "--out", out)
    assert "1 image(s) not found under" in message and "ghost.png (missing.csv, line 3)" in message
    assert "set --image-root to the folder the paths are relative to" in message
    message = user_error("convert", "train-labels", missing, "--image-root", tmp_path / "nope", "--out", out)
    assert "nope: image root not found" in message

    (caption_folder / "images" / "p1.jpg").unlink()
    message = user_error("convert", "train-captions", caption_folder, "--out", out)
    assert "p1.jpg (captions.csv, image p1.jpg)" in message
    write_csv(caption_folder / "captions.csv", "image,caption\n")
    message = user_error("convert", "train-captions", caption_folder, "--out", out)
    assert "captions.csv: no captions; add rows image,caption" in message
    message = user_error("convert", "train-captions", caption_folder, "--direction", "x2y", "--out", out)
    assert "--direction 'x2y': use t2i" in message
    assert not out.exists()


# -- caption-agreement labels (the classification eval set) --------------------------------------


def test_labels_from_captions_rules(tmp_path):
    from magic_mm.data.labels_from_captions import labels_from_captions

    root = tmp_path / "set"
    root.mkdir()
    photos = {
        "dog1": ["a dog runs", "two dogs play", "a puppy", "a hotdog stand", "grass"],  # dog: 3 (not hotdog)
        "dog2": ["A DOG.", "dog", "the dog!", "a man", "a man"],  # dog 3, man 2 → dog
        "both": ["a dog and a boy", "a boy with his dog", "a dog , a kid", "x", "y"],  # dog 3 + child 3
        "none": ["a dog", "a dog", "a manhole", "women", "a cat"],  # dog 2; 'manhole' is no man
        "kid1": ["a girl", "a boy", "the children", "x", "y"],
        "kid2": ["a girl", "a girl", "a girl", "x", "y"],
        "kid3": ["kids", "kids", "kids", "a dog", "a dog"],
        "woman": ["a woman", "two women", "a lady", "x", "y"],  # one photo only: a rare label
    }
    write_csv(root / "captions.csv", "image,caption\n" + "".join(
        f"{name}.jpg,{caption.replace(',', ' ')}\n" for name, caps in photos.items() for caption in caps))
    result = labels_from_captions(root, split=None, min_agree=3, min_photos=2)
    assert result.pairs == [("dog1.jpg", "dog"), ("dog2.jpg", "dog"), ("kid1.jpg", "child"), ("kid2.jpg", "child"),
                            ("kid3.jpg", "child")]
    assert (result.ambiguous, result.unlabelled, result.rare) == (1, 1, {"woman": 1})
    assert result.counts == {"child": 3, "dog": 2}
    assert result.majority_baseline == pytest.approx(3 / 5)
    with pytest.raises(Exception, match="only 1 label"):
        labels_from_captions(root, split=None, min_agree=3, min_photos=3)


def test_caption_labels_cli_writes_an_eval_task(tmp_path, flickr_dir):
    out = ok_json("convert", "caption-labels", flickr_dir, "--split", "test", "--out", tmp_path / "labels.jsonl",
                  "--labels-csv", tmp_path / "labels.csv")
    counts = out["photos_per_label"]
    assert counts == {"child": 55, "dog": 33, "man": 30, "woman": 16}
    assert out["rows"] == sum(counts.values()) == 134 and out["candidates_per_query"] == 4
    assert out["majority_baseline"] == pytest.approx(55 / 134)
    assert out["dropped_rare_labels"] == {"bicycle": 4, "snow": 3, "water": 4}
    task = read_task(tmp_path / "labels.jsonl")
    csv_rows = (tmp_path / "labels.csv").read_text().splitlines()[1:]
    for row, line in zip(task, csv_rows, strict=True):
        image, label = line.split(",")
        assert row.query.image.name == image and row.query.text is None
        assert row.candidates[0].text == label and sorted(c.text for c in row.candidates) == sorted(counts)
        assert row.query.instruction == "Represent the given image for classification."
    # The committed eval set (tasks-classification.yaml) is exactly what the generator writes.
    committed = read_task(REPO / "data" / "flickr8k-test-labels.jsonl")
    assert [(r.query.image.resolve(), [c.text for c in r.candidates]) for r in committed] == \
        [(r.query.image.resolve(), [c.text for c in r.candidates]) for r in task]


# -- ImageNet pseudo-labels -------------------------------------------------------------------


def test_imagenet_classifier_shape_and_determinism(tmp_path):
    from magic_mm.data.pseudo_labels import classify, imagenet_class_names

    paths = []
    for n in range(3):
        paths.append(tmp_path / f"x{n}.png")
        make_image(64, 48, seed=n).save(paths[-1])
    ids, probs = classify(paths, k=5, batch_size=2)
    assert ids.shape == probs.shape == (3, 5)
    assert ((probs > 0) & (probs <= 1)).all() and (probs[:, :-1] >= probs[:, 1:]).all()
    ids2, probs2 = classify(paths, k=5, batch_size=3)  # other batching, same answer
    assert (ids == ids2).all() and (probs - probs2).abs().max() < 1e-5
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "Golden Retriever"


def test_imagenet_head_and_names_agree_on_a_dog(flickr_dir):
    """The names follow the head's class order: a photo every caption calls a dog gets dog breeds."""
    from magic_mm.data.pseudo_labels import classify

    dog = flickr_dir / "images" / "1001773457_577c3a7d70.jpg"  # 'dog' in the caption-agreement set
    ids, _ = classify([dog], k=3)
    assert all(151 <= int(i) <= 268 for i in ids[0]), ids  # ImageNet's dog classes


def test_imagenet_labels_cli(tmp_path, caption_folder):
    from magic_mm.data.pseudo_labels import pseudo_labels

    out = ok_json("convert", "imagenet-labels", caption_folder, "--split", "train", "--min-probability", "0",
                  "--out", tmp_path / "pseudo.csv")
    assert (out["images"], out["labelled"]) == (2, 2)
    lines = (tmp_path / "pseudo.csv").read_text().splitlines()
    assert lines[0] == "image,label,score" and [line.split(",")[0] for line in lines[1:]] == ["p0.jpg", "p1.jpg"]
    images = caption_folder / "images"
    every = pseudo_labels(["p0.jpg", "p1.jpg", "p2.jpg"], images, min_probability=0.0)
    assert [p.label for p in every[:2]] == [line.split(",")[1] for line in lines[1:]]
    cut = sorted(p.probability for p in every)[1]  # keeps the images at or above the second-lowest
    assert [p.image for p in pseudo_labels(["p0.jpg", "p1.jpg", "p2.jpg"], images, cut)] == \
        [p.image for p in every if p.probability >= cut]
    assert len([p for p in every if p.probability >= cut]) == 2
    message = user_error("convert", "imagenet-labels", images, "--split", "train", "--out", tmp_path / "x.csv")
    assert "--split needs an image–caption folder" in message


# -- the default model's mixture --------------------------------------------------------------


def test_default_mixture_config_reads_and_matches_the_converters(flickr_dir):
    from magic_mm.data.pseudo_labels import classify, imagenet_class_names
    from magic_mm.data.train_convert import TRAIN_KINDS, caption_pairs
    from magic_mm.train.config import load_config

    config = load_config(REPO / "configs" / "default-model" / "stage2-s2.yaml")
    specs = {spec.label: spec for spec in config.datasets}
    assert list(specs) == ["flickr8k-t2i", "flickr8k-i2t", "flickr8k-t2t", "imagenet-pseudo"]
    assert sum(spec.weight for spec in specs.values()) == pytest.approx(1.0)
    kinds = {"flickr8k-t2i": "t2i", "flickr8k-i2t": "i2t", "flickr8k-t2t": "t2t", "imagenet-pseudo": "classification"}
    for name, spec in specs.items():
        kind = TRAIN_KINDS[kinds[name]]
        assert (spec.query_instruction, spec.candidate_instruction) == (kind.query_instruction,
                                                                        kind.candidate_instruction)
    readers = {name: open_subdataset(spec, base=REPO) for name, spec in specs.items()}  # images checked
    assert {name: len(r) for name, r in readers.items()} == {
        "flickr8k-t2i": 3370, "flickr8k-i2t": 674, "flickr8k-t2t": 674, "imagenet-pseudo": 299}
    for direction in ("t2i", "i2t", "t2t"):  # the committed files are what the converter writes now
        fresh = caption_pairs(flickr_dir, direction, "train").rows
        committed = [json.loads(line) for line in (REPO / specs[f"flickr8k-{direction}"].file).read_text().splitlines()]
        assert committed == fresh
    # Pseudo-labels: each is the head's top-1 class name (checked on a few rows).
    names = imagenet_class_names()
    sample = list(readers["imagenet-pseudo"])[::60]
    ids, probs = classify([row.query.image for row in sample])
    assert [row.positive.text for row in sample] == [names[int(i)] for i in ids[:, 0]]
    assert (probs[:, 0] >= 0.3).all()
    assert all(row.negatives[0].text != row.positive.text for row in readers["imagenet-pseudo"])
