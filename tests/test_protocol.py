"""The wire encoding of server frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatbot import protocol

# What a frame may hold: JSON values, with any text (lone surrogates included: the encoder
# must write them as `json.dumps` does, whatever a later UTF-8 encoder makes of them).
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), _values, max_size=6))
def test_a_frame_is_encoded_as_compact_json_with_unicode_left_unescaped(
    frame: dict[str, Any],
) -> None:
    expected = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
    assert protocol.encode(frame) == expected


def test_a_frame_that_is_not_json_is_refused_as_json_dumps_refuses_it() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        protocol.encode({"type": "delta", "text": object()})
