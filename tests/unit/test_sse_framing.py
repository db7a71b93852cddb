"""The SSE splitter against the WHATWG event-stream grammar: any framing, any split, same events."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline.sse import EventTooLarge, SseSplitter, canonical_event

FIXTURES = Path(__file__).parent.parent / "fixtures" / "vllm-0.32.0-cpu"
LIMIT = 1 << 20


def feed_all(pieces: list[bytes], limit: int = LIMIT) -> bytes:
    s = SseSplitter(limit)
    out = b"".join(s.feed(p) for p in pieces)
    assert s.pending == 0, "bytes left over after the last blank line"
    return out


def split_at(raw: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(
    "name", ["chat_stream.sse", "chat_stream_continuous_usage.sse", "completions_stream.sse"]
)
def test_a_recorded_vllm_stream_comes_out_as_its_own_bytes_at_every_split(name: str) -> None:
    raw = (FIXTURES / name).read_bytes()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert feed_all([raw]) == raw
    for cut in range(len(raw) + 1):
        assert feed_all(split_at(raw, cut)) == raw, cut


def test_the_vllm_fast_path_returns_the_arriving_object() -> None:
    raw = (FIXTURES / "chat_stream.sse").read_bytes()
    first = raw[: raw.index(b"\n\n") + 2]
    assert SseSplitter(LIMIT).feed(first) is first  # not a copy: a byte relay


# ------------------------------------------------------------------ the grammar, framed three ways
# One event: (comment lines, event type or None, id or None, data lines); framings differ only
# in line endings, in "data:" with or without its space, and in where comments and fields sit.
_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=0, max_size=12
)
_event = st.tuples(
    st.lists(_text, max_size=2),
    st.one_of(st.none(), st.sampled_from(["message", "completion", "ping"])),
    st.one_of(st.none(), _text),
    st.lists(_text, min_size=1, max_size=3),
)


def frame(events: list[tuple[list[str], str | None, str | None, list[str]]], eol: str, space: bool) -> bytes:
    out = []
    for comments, kind, id_, data in events:
        lines = [f":{c}" for c in comments]
        if kind is not None:
            lines.append(f"event:{' ' if space else ''}{kind}")
        if id_ is not None:
            lines.append(f"id: {id_}")
        # A value that starts with a space needs the separator space even in the space-less
        # framing, or the standard strips the value's own space.
        lines += [f"data:{' ' if space or d.startswith(' ') else ''}{d}" for d in data]
        out.append(eol.join(lines) + eol + eol)
    return "".join(out).encode()


def expected(events: list[tuple[list[str], str | None, str | None, list[str]]]) -> bytes:
    return b"".join(canonical_event("\n".join(data).encode()) for _, _, _, data in events)


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, min_size=1, max_size=5), st.data())
def test_same_events_in_any_line_ending_split_anywhere_give_the_same_events(
    events: list[tuple[list[str], str | None, str | None, list[str]]], data: st.DataObject
) -> None:
    want = expected(events)
    for eol in ("\n", "\r\n", "\r"):
        for space in (True, False):
            raw = frame(events, eol, space)
            cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4), label=f"cuts {eol!r}")
            assert feed_all(split_at(raw, *cuts)) == want, (eol, space, raw, cuts)
            assert feed_all([raw[i : i + 1] for i in range(len(raw))]) == want  # byte by byte


def test_every_single_split_of_a_crlf_stream() -> None:
    raw = b': hello\r\nevent: message\r\ndata:{"a":1}\r\n\r\ndata: [DONE]\r\n\r\n'
    want = b'data: {"a":1}\n\ndata: [DONE]\n\n'
    for cut in range(len(raw) + 1):
        assert feed_all(split_at(raw, cut)) == want, cut


def test_cr_at_the_end_of_one_read_and_lf_at_the_start_of_the_next_is_one_line_end() -> None:
    assert feed_all([b"data: a\r", b"\n\r", b"\n"]) == b"data: a\n\n"


def test_multi_line_json_data_becomes_one_line_and_other_data_keeps_its_lines() -> None:
    assert feed_all([b'data: {"a":\ndata:  1}\n\n']) == b'data: {"a":  1}\n\n'
    assert feed_all([b"data: one\ndata: two\n\n"]) == b"data: one\ndata: two\n\n"


def test_event_error_without_an_error_key_is_wrapped_in_one() -> None:
    got = feed_all([b'event: error\ndata: {"message":"overloaded"}\n\n'])
    assert got == b'data: {"error":{"message":"overloaded"}}\n\n'


def test_an_event_with_no_data_is_not_an_event() -> None:
    assert feed_all([b": keep-alive\n\nevent: ping\n\ndata: x\n\n"]) == b"data: x\n\n"


# ------------------------------------------------------------------ size bound
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_an_unfinished_event_past_the_limit_raises(eol: bytes) -> None:
    s = SseSplitter(64 * 1024)
    assert s.feed(b"data: ok" + eol + eol) == b"data: ok\n\n"
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            s.feed(b"data: " + b"x" * 8192)  # never a line end


def test_an_event_at_the_limit_passes_and_one_byte_more_does_not() -> None:
    limit = 64 * 1024
    body = b"data: " + b"x" * (limit - 6)
    assert len(body) == limit
    assert SseSplitter(limit).feed(body[:100]) == b""
    s = SseSplitter(limit)
    s.feed(body)
    assert s.feed(b"\n\n") == body + b"\n\n"
    s = SseSplitter(limit)
    with pytest.raises(EventTooLarge):
        s.feed(body + b"x")


def test_many_small_reads_of_one_event_cost_linear_work() -> None:
    # 4 MiB in 4 KiB reads: a quadratic buffer would copy ~2 GiB; this must finish at list speed.
    s = SseSplitter(8 << 20)
    piece = b"x" * 4096
    assert s.feed(b"data: ") == b""
    for _ in range(1024):
        assert s.feed(piece) == b""
    assert s.pending == 6 + 4096 * 1024
    assert s.feed(b"\n\n") == b"data: " + piece * 1024 + b"\n\n"


def test_event_error_that_already_has_an_error_key_is_left_alone() -> None:
    raw = b'event: error\ndata: { "error": {"message": "x"}}\n\n'
    assert feed_all([raw]) == b'data: { "error": {"message": "x"}}\n\n'
