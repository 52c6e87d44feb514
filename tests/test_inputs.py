"""Every way an input can be bad gives a UserError that names it."""

import io
import warnings
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image
from magic_mm.errors import BadImageError, BadInputError, BadTextError
from magic_mm.model.embedder import TextTruncatedWarning
from magic_mm.model.inputs import MAX_IMAGE_PIXELS, MMInput, load_image, prepare


def jpeg_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    make_image(*size).save(buf, "JPEG")
    return buf.getvalue()


def test_path_bytes_and_pil_all_decode_to_rgb(tmp_path):
    path = tmp_path / "ok.png"
    make_image().convert("L").save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (96, 64)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="no such file") as e:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(e.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(BadImageError, match="folder"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.jpg: the file is empty"):
        load_image(path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image")
    with pytest.raises(BadImageError, match="notes.jpg: not a readable image"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    data = jpeg_bytes((256, 256))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="cut.jpg: the image data is corrupt or truncated"):
        load_image(path)


def test_corrupt_png(tmp_path):
    buf = io.BytesIO()
    make_image().save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[60:120] = b"\x00" * 60  # wreck the compressed pixel stream
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="broken.png"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # 9000×9000 = 81 MP of 1-bit pixels compresses to a tiny file but exceeds the 64 MP cap.
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)
    assert path.stat().st_size < 200_000
    with pytest.raises(BadImageError, match=r"bomb.png: 9000×9000 = 81,000,000 pixels exceeds the limit of 64,000,000"):
        load_image(path)
    assert 9000 * 9000 > MAX_IMAGE_PIXELS


def test_empty_text_is_refused_with_its_position():
    with pytest.raises(BadTextError, match=r"input #3 .*the text is empty"):
        prepare("   ", index=3)


def test_image_with_blank_caption_is_just_the_image():
    prepared = prepare(MMInput(image=make_image(), text=" "))
    assert prepared.text is None and prepared.image is not None


@pytest.mark.parametrize("bad", [42, None, ["a"], {"picture": "x"}, {}])
def test_unsupported_input_types(bad):
    with pytest.raises(BadInputError):
        prepare(bad)


def test_input_forms():
    img = make_image()
    assert prepare("hello").text == "hello"
    assert prepare((img, "cap")).text == "cap"
    assert prepare({"image": img, "text": "cap"}).image is not None
    assert prepare(jpeg_bytes()).image.size == (64, 48)


def test_over_long_text_is_truncated_with_a_warning(tiny_composed):
    limit = tiny_composed.config.max_text_tokens
    long_text = "word " * (limit * 2)
    with pytest.warns(TextTruncatedWarning, match=f"truncated to the first {limit}"):
        vec_long = tiny_composed.encode([long_text])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TextTruncatedWarning)
        vec_cut = tiny_composed.encode([tiny_composed.backbone.tokenizer.decode(
            tiny_composed.backbone.tokenizer(long_text, add_special_tokens=False)["input_ids"][:limit])])
    assert abs(vec_long - vec_cut).max() < 1e-5


def test_over_long_instruction_is_truncated_like_a_text(tiny_composed):
    limit = tiny_composed.config.max_text_tokens
    tokenizer = tiny_composed.backbone.tokenizer
    long_instruction = "Find the photo. " * limit
    with pytest.warns(TextTruncatedWarning, match=f"instruction: text has .* truncated to the first {limit}"):
        vec_long = tiny_composed.encode(["a dog"], instruction=long_instruction)
    cut = tokenizer.decode(tokenizer(long_instruction, add_special_tokens=False)["input_ids"][:limit])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TextTruncatedWarning)
        vec_cut = tiny_composed.encode(["a dog"], instruction=cut)
    assert abs(vec_long - vec_cut).max() < 1e-5


def test_encode_names_the_bad_item_in_a_batch(tiny_composed, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadImageError, match=r"input #1 \(.*bad.jpg\)"):
        tiny_composed.encode(["fine", Path(bad)])


def test_a_str_naming_an_image_file_stays_text_but_warns_once(tiny_composed, tmp_path, monkeypatch):
    """``encode(["photo.jpg"])`` embeds the file name; the user is told (once per process) to pass a Path."""
    from magic_mm.model import inputs
    from magic_mm.model.inputs import PathAsTextWarning

    monkeypatch.setattr(inputs, "_path_as_text_warned", False)
    photo, other = tmp_path / "photo.jpg", tmp_path / "other.png"
    make_image().save(photo)
    make_image().save(other)
    (tmp_path / "notes.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a text that merely looks like a file name, and a non-image file: no warning
        prepare(str(tmp_path / "missing.jpg"))
        prepare(str(tmp_path / "notes.txt"))
        assert not [w for w in caught if issubclass(w.category, PathAsTextWarning)]
        as_text = tiny_composed.encode([str(photo), str(other)])
        tiny_composed.encode([str(photo)])
    warned = [w for w in caught if issubclass(w.category, PathAsTextWarning)]
    assert len(warned) == 1 and "pathlib.Path" in str(warned[0].message) and "photo.jpg" in str(warned[0].message)
    assert issubclass(PathAsTextWarning, UserWarning)
    # the str stayed a text: its vector is the file name's, not the picture's
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(as_text[0], tiny_composed.encode([MMInput(text=str(photo))])[0], atol=1e-5)
    assert np.abs(as_text[0] - tiny_composed.encode([photo])[0]).max() > 1e-3


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_never_below_the_size_asked(tmp_path):
    path, png = tmp_path / "big.jpg", tmp_path / "big.png"
    make_image(1000, 700).save(path, "JPEG")
    make_image(1000, 700).save(png)
    assert load_image(path).size == (1000, 700)  # no size asked: full size
    # 700 // 128 = 5 → libjpeg's 1/4 scale, the largest of 1/2, 1/4, 1/8 that stays ≥ 128 × 128
    assert load_image(path, decode_size=(128, 128)).size == (250, 175)
    assert load_image(path.read_bytes(), decode_size=(128, 128)).size == (250, 175)
    assert load_image(path, decode_size=(448, 448)).size == (1000, 700)  # 700 < 2 × 448: full size
    assert load_image(png, decode_size=(128, 128)).size == (1000, 700)  # only JPEG decodes at a scale
    assert prepare(path, 0, decode_size=(128, 128)).image.size == (250, 175)
