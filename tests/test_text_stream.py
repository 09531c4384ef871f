"""TextAssembler: a stop string ends the text (never leaking, even split over tokens) and is
named in `matched`: the earliest in the text, and of two at one place the first listed."""

from __future__ import annotations

from llm_api.services.llm.text_stream import TextAssembler


def run(stop: list[str], pieces: list[bytes]) -> tuple[str, TextAssembler]:
    text = TextAssembler(stop)
    out = ""
    for piece in pieces:
        out += text.push(piece)
        if text.stopped:
            break
    return out + text.flush(), text


def test_the_earliest_match_is_named_even_across_tokens() -> None:
    out, text = run(["lo", "world", "wor"], [b"hel", b"l", b"o wo", b"rld"])
    assert out == "hel" and text.stopped and text.matched == "lo"
    # Both at one place, in one piece: the first listed.
    out, text = run(["world", "wor"], [b"hello world"])
    assert out == "hello " and text.matched == "world"
    # Token by token the shorter one is whole first, and generation stops there.
    out, text = run(["world", "wor"], [b"hello w", b"or", b"ld"])
    assert out == "hello " and text.matched == "wor"


def test_no_match_names_nothing() -> None:
    out, text = run(["xyz"], [b"hello ", b"x", b"y"])
    assert out == "hello xy" and not text.stopped and text.matched is None
