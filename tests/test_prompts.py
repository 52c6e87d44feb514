import pytest

from magic_mm.model.prompts import IMAGE, build_prompt, shared_opening


def test_query_with_image_and_text_follows_the_paper():
    p = build_prompt("query", "Find me an everyday image that matches the given query.", "a dog", True)
    assert p.segments == ("Instruct: Find me an everyday image that matches the given query.\n", IMAGE, "\nQuery: a dog")
    assert p.render() == "Instruct: Find me an everyday image that matches the given query.\n<image>\nQuery: a dog"


def test_candidate_uses_text_label():
    p = build_prompt("candidate", "Represent the given image.", "a caption", True)
    assert p.render() == "Instruct: Represent the given image.\n<image>\nText: a caption"


@pytest.mark.parametrize(
    "instruction, text, image, expected",
    [
        ("Do it.", None, True, "Instruct: Do it.\n<image>"),
        ("Do it.", "hi", False, "Instruct: Do it.\nQuery: hi"),
        (None, "hi", False, "Query: hi"),
        ("", None, True, "<image>"),
        (None, "hi", True, "<image>\nQuery: hi"),
    ],
)
def test_absent_parts_are_left_out(instruction, text, image, expected):
    p = build_prompt("query", instruction, text, image)
    assert p.render() == expected
    assert p.has_image == image


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError):
        build_prompt("document", None, "x", False)


def test_the_instruction_line_is_a_segment_of_its_own_and_the_shared_opening():
    query = build_prompt("query", "Find it.", "a dog", False)
    assert query.segments == ("Instruct: Find it.\n", "Query: a dog")
    assert shared_opening(query.segments) == "Instruct: Find it.\n"
    assert shared_opening(build_prompt("query", None, "a dog", False).segments) is None
    assert shared_opening(build_prompt("query", "Find it.", None, False).segments) is None  # nothing after it
