"""Range header parsing against a slicing model of RFC 9110."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cifar5m.dataset_server.ranges import RangeNotSatisfiable, parse_range


@pytest.mark.parametrize(("header", "size", "want"), [
    ("bytes=0-9", 100, (0, 10)), ("bytes=10-", 100, (10, 100)), ("bytes=-10", 100, (90, 100)),
    ("bytes=-1000", 100, (0, 100)), ("bytes=95-1000", 100, (95, 100)), ("BYTES = 3 - 4", 100, (3, 5)),
    ("bytes=99-99", 100, (99, 100)),
])
def test_satisfiable(header, size, want):
    rng = parse_range(header, size)
    assert (rng.start, rng.end) == want and rng.size == size
    assert rng.content_range == f"bytes {want[0]}-{want[1] - 1}/{size}"


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=100-200", 100),
                                              ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0)])
def test_not_satisfiable(header, size):
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    assert info.value.content_range == f"bytes */{size}"


@pytest.mark.parametrize("header", [None, "", "bytes=", "bytes=-", "bytes=5-2", "items=0-1",
                                    "bytes=0-1,3-4", "bytes=a-b", "bytes=1-2-3", "bytes=" + "9" * 30 + "-"])
def test_ignored_headers_mean_the_whole_file(header):
    assert parse_range(header, 100) is None


@given(size=st.integers(0, 10_000), a=st.integers(0, 20_000), b=st.integers(0, 20_000))
def test_matches_slicing(size, a, b):
    data = range(size)
    for header, want in ((f"bytes={a}-{b}", data[a:b + 1]), (f"bytes={a}-", data[a:]),
                         (f"bytes=-{b}", data[max(size - b, 0):] if b else None)):
        if header.endswith(f"={a}-{b}") and b < a:
            assert parse_range(header, size) is None
            continue
        if (header.startswith("bytes=-") and (b == 0 or size == 0)) or (not header.startswith("bytes=-") and a >= size):
            with pytest.raises(RangeNotSatisfiable):
                parse_range(header, size)
            continue
        rng = parse_range(header, size)
        assert data[rng.start:rng.end] == want
