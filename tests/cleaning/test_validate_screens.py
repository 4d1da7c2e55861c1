"""Validation's polars screens are exact: their text classes are Python's own on every code point, and
(property tests, hypothesis) every row a per-row check drops is flagged by its screen, so the screened
stage equals the per-row stage."""

from __future__ import annotations

import pytest

from ground.settings import CleanSettings
from support.validate_rows import GOOD, make_example, table_of
from tasks.cleaning.text_checks import degenerate_detail
from tasks.cleaning.validate import validate_examples


@pytest.fixture(scope="module")
def cfg() -> CleanSettings:
    return CleanSettings()


def test_python_text_classes_are_pythons_own_on_every_code_point():
    """The screens' whitespace, letter/digit and case-folding tables agree with str on all of Unicode."""
    import numpy as np
    import polars as pl

    from tasks.cleaning.validate import python_text_classes

    classes = python_text_classes()
    codepoints = np.arange(0x110000, dtype="<u4")
    chars = list(codepoints[(codepoints < 0xD800) | (codepoints >= 0xE000)].tobytes().decode("utf-32-le"))
    series = pl.Series(chars)
    assert series.str.contains(classes.alnum).to_list() == [c.isalnum() for c in chars]
    assert series.str.contains(classes.whitespace_run).to_list() == [c.isspace() for c in chars]
    assert series.str.contains(classes.other_whitespace).to_list() == [c.isspace() and c != " " for c in chars]
    assert series.str.replace_many(classes.fold_from, classes.fold_to).to_list() == [c.casefold() for c in chars]


SPACES = [" ", "  ", " ", " ", "\t", "\n", "\v", "\x1c", "\x85", "\xa0", "\u1680", "\u2028", "\u3000", ""]
PIECES = [
    "heat",
    "pump",
    "HEAT",
    "Heat",
    "Straße",
    "STRASSE",
    "ſ",
    "\u212a",
    "k",
    "ΣΑΣ",
    "σας",
    "ﬁ",
    "ǅ",
    "是",
    "नमस्ते",
    "e\u0301",
    "a",
    "1",
    "42",
    "?!",
    "...",
    "—",
    "~",
    "retrieve",
    "documents",
    "answer",
]


def _texts():
    from hypothesis import strategies as st

    piece = st.one_of(st.sampled_from(PIECES), st.text(max_size=4))
    prose_like = st.lists(st.tuples(piece, st.sampled_from(SPACES)), max_size=80).map(
        lambda parts: "".join(p + s for p, s in parts)
    )
    loop = st.builds(
        lambda unit, k, pad: pad + unit * k + pad,
        st.text(min_size=1, max_size=12),
        st.integers(1, 120),
        st.sampled_from(SPACES),
    )
    return st.one_of(st.none(), prose_like, loop, st.text(max_size=300))


def test_degenerate_screen_flags_every_text_degenerate_detail_drops():
    """Property: a text the screen lets through is one degenerate_detail calls fine (and live rows only)."""
    import numpy as np
    import pyarrow as pa
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tasks.cleaning.text_checks import letter_ratios
    from tasks.cleaning.validate import degenerate_screen

    @settings(max_examples=150, deadline=None)
    @given(st.lists(_texts(), min_size=1, max_size=40), st.randoms())
    def check(texts, rnd):
        live = np.array([rnd.random() < 0.8 for _ in texts])
        column = pa.array(texts, pa.string())
        flagged, ratios = degenerate_screen(pa.chunked_array([column]), live)
        references = letter_ratios(column)  # of the unstripped texts, as the stage has always used
        for text, alive, flag, ratio, reference in zip(texts, live, flagged, ratios, references, strict=True):
            if not alive or text is None or not text.strip():
                assert not flag
                continue
            detail = degenerate_detail(text, float(reference))
            assert flag or detail is None, repr(text)
            assert degenerate_detail(text, float(ratio)) == detail  # the screen's ratio gives the same verdict

    check()


def test_instruction_leak_screen_flags_every_row_instruction_leak_detail_drops():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tasks.cleaning.dedup import dedup_keys
    from tasks.cleaning.text_checks import instruction_leak_detail
    from tasks.cleaning.validate import instruction_leak_screen

    instruction = GOOD["retrieval"]["instruction"]
    odd_spaced = st.builds(lambda space: instruction.replace(" ", space, 3), st.sampled_from(SPACES))
    texts = st.one_of(
        _texts(),
        st.builds(lambda a, b: f"{a or ''} {instruction} {b or ''}", _texts(), _texts()),
        st.just(instruction.upper()),
        st.just("retrieve documents answer heat"),
        odd_spaced,
    )

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.one_of(st.just(instruction), _texts()), texts, texts), min_size=1, max_size=30))
    def check(rows):
        keys = [dedup_keys([row[k] for row in rows]) for k in range(3)]
        flagged = instruction_leak_screen(*keys)
        for i, flag in enumerate(flagged):
            instr, query, positive = (keys[k][i].as_py() for k in range(3))
            leaks = instruction_leak_detail(instr, query or "", positive or "") is not None
            assert flag or not leaks, rows[i]

    check()


def test_screened_stage_equals_the_per_row_stage(cfg):
    """End to end: validate_examples with its screens equals it with every row sent to the per-text checks."""
    from unittest import mock

    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tasks.cleaning import validate
    from tasks.cleaning.text_checks import letter_ratios

    def every_degenerate(texts, live):
        return live.copy(), letter_ratios(texts)

    every_leak = lambda instruction_n, query_n, positive_n: np.ones(len(query_n), dtype=bool)  # noqa: E731
    fields = st.fixed_dictionaries(
        {}, optional={"query": _texts(), "positive": _texts(), "negative": _texts(), "instruction": _texts()}
    )

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(list(GOOD)), fields), min_size=1, max_size=25))
    def check(rows):
        table = table_of([make_example(i, t, **overrides) for i, (t, overrides) in enumerate(rows)])
        screened = validate_examples(table, cfg)
        with (
            mock.patch.object(validate, "degenerate_screen", every_degenerate),
            mock.patch.object(validate, "instruction_leak_screen", every_leak),
        ):
            per_row = validate_examples(table, cfg)
        assert screened.kept.equals(per_row.kept)
        assert screened.dropped.equals(per_row.dropped)

    check()
