"""Validation stage: every reason fires on a crafted row, good rows of every type pass, order and
schema are kept, dropped rows carry stage, reason and detail. The vectorised screens are checked
against the per-row checks in ``test_validate_screens.py``."""

from __future__ import annotations

import pytest

from ground.settings import CleanSettings
from storage.schemas import DROPPED_SCHEMA, EXAMPLE_SCHEMA
from support.validate_rows import EN_DOC, EN_QUERY, GOOD, make_example, placeholders, table_of
from tasks.cleaning.text_checks import degenerate_detail, language_code
from tasks.cleaning.validate import validate_examples

FR_DOC = (
    "Le changement climatique est un défi majeur pour notre société et nécessite des actions rapides "
    "de la part des gouvernements, des entreprises et des citoyens."
)
WORDS = (
    "energy house winter pump heat cold air water garden kitchen window roof wall insulation cost "
    "price family neighbour city village engineer plumber summer autumn spring morning evening night "
    "system device pipe floor ceiling door heating cooling solar panel battery grid power bill month "
    "year installation repair service warranty noise comfort temperature sensor thermostat"
).split()


def prose(n_words: int, seed: int) -> str:
    """Varied English-like text of ``n_words`` words (compresses like prose, not like a loop)."""
    import random

    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        k = rng.randint(6, 14)
        sentences.append("The " + " ".join(rng.choice(WORDS) for _ in range(k)) + ".")
        count += k + 1
    return " ".join(sentences)


DE_DOC = (
    "Der Klimawandel ist eine große Herausforderung für unsere Gesellschaft und erfordert schnelles "
    "Handeln von Regierungen, Unternehmen und Bürgern."
)


@pytest.fixture(scope="module")
def cfg() -> CleanSettings:
    return CleanSettings()


def reasons(result) -> dict[str, str]:
    return dict(
        zip(result.dropped.column("example_id").to_pylist(), result.dropped.column("reason").to_pylist(), strict=True)
    )


def test_good_rows_of_every_type_pass(cfg):
    rows = [make_example(i, t) for i, t in enumerate(GOOD)]
    result = validate_examples(table_of(rows), cfg)
    assert result.dropped.num_rows == 0, result.dropped.to_pylist()
    assert result.kept.num_rows == len(rows)


CASES = [
    ("empty_query", "retrieval", dict(query="   ")),
    ("empty_query", "retrieval", dict(query=None)),
    ("empty_positive", "sts", dict(positive="")),
    ("missing_negative", "retrieval", dict(negative=None)),
    ("missing_negative", "classification", dict(negative=" ")),
    ("query_too_short", "retrieval", dict(query="a")),
    ("query_too_long", "retrieval", dict(query=(EN_QUERY + " ") * 40)),
    ("positive_too_short", "retrieval", dict(positive="ok")),
    ("positive_too_long", "retrieval", dict(positive=(EN_DOC + " ") * 130)),
    ("negative_too_short", "retrieval", dict(negative="too short")),
    ("positive_too_long", "classification", dict(positive="a label that is far too long " * 5)),
    ("negative_too_long", "classification", dict(negative="a misleading label that rambles " * 5)),
    ("degenerate", "retrieval", dict(positive="aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")),
    ("degenerate", "retrieval", dict(negative="I love you. " * 20)),
    ("degenerate", "retrieval", dict(query="?!?! ... ---")),
    ("positive_equals_query", "short_short", dict(positive="  PHOTOSYNTHESIS!! ")),
    ("positive_equals_negative", "classification", dict(negative="Negative.")),
    ("positive_equals_negative", "retrieval", dict(negative=EN_DOC.upper())),
    ("instruction_leak", "retrieval", dict(query="given a home heating question, retrieve documents that answer it")),
    (
        "instruction_leak",
        "retrieval",
        dict(
            positive="Task: Given a home heating question, retrieve documents "
            "that answer it. Here is the answer: use a heat pump."
        ),
    ),
    ("instruction_leak", "short_short", dict(query="match a term with definition")),
    # U+2028 survives normalization and splits tokens for Python: the query is all instruction tokens
    (
        "instruction_leak",
        "retrieval",
        dict(query="given\u2028a\u2028home heating question, retrieve documents that answer it"),
    ),
    ("language_mismatch", "retrieval", dict(positive=FR_DOC)),
    ("language_mismatch", "retrieval", dict(positive=DE_DOC)),
    # bitext: English asked for the target (tgt_lang German is the default here)
    (
        "language_mismatch",
        "bitext",
        dict(positive="Today the weather is lovely, and the kids are out playing in the park."),
    ),
]


@pytest.mark.parametrize("reason,task_type,overrides", CASES)
def test_each_reason_fires_on_a_crafted_row(cfg, reason, task_type, overrides):
    good = make_example(0, task_type)
    bad = make_example(1, task_type, **overrides)
    result = validate_examples(table_of([good, bad]), cfg)
    assert reasons(result) == {bad["example_id"]: reason}, result.dropped.to_pylist()
    assert result.kept.column("example_id").to_pylist() == [good["example_id"]]
    detail = result.dropped.column("detail")[0].as_py()
    assert detail and isinstance(detail, str)


def test_first_failing_check_is_the_reason(cfg):
    row = make_example(0, "retrieval", query="", negative=None, positive="zz")
    assert set(reasons(validate_examples(table_of([row]), cfg)).values()) == {"empty_query"}
    row = make_example(1, "retrieval", negative=None, positive="zz")
    assert set(reasons(validate_examples(table_of([row]), cfg)).values()) == {"missing_negative"}


def test_bounds_depend_on_the_field_role(cfg):
    rows = [
        # a 1-character classification label is fine (labels are not documents)
        make_example(0, "classification", positive="是", negative="否"),
        # a long_long query is a document: doc bounds, not the 2000-char query bound
        make_example(1, "long_long", query=prose(500, seed=1)),
        # a short_short positive with no negative is fine
        make_example(2, "short_short"),
        # the same 1-character positive is too short for a retrieval document
        make_example(3, "retrieval", positive="是"),
        make_example(4, "retrieval", query=prose(500, seed=2)),
    ]
    result = validate_examples(table_of(rows), cfg)
    assert reasons(result) == {rows[3]["example_id"]: "positive_too_short", rows[4]["example_id"]: "query_too_long"}


def test_language_mismatch_needs_enough_text_and_can_be_switched_off(cfg):
    french_short = "Je ne sais pas pourquoi il est parti."  # 37 < language_min_chars (40): not checked
    rows = [
        make_example(0, "retrieval", query=FR_DOC),  # English asked, French given
        make_example(1, "retrieval", query=french_short),
        make_example(
            2,
            "retrieval",
            placeholders=placeholders("retrieval", "French"),
            query=FR_DOC,
            positive=FR_DOC.replace("majeur", "important"),
            negative=None,
        ),
        make_example(
            3,
            "retrieval",
            placeholders=placeholders("retrieval", "French"),
            query=FR_DOC,
            positive=FR_DOC.replace("majeur", "important"),
            negative=FR_DOC.replace("rapides", "lentes"),
        ),
        make_example(4, "retrieval", placeholders=placeholders("retrieval", "Klingon"), positive=FR_DOC),
        make_example(5, "retrieval", placeholders="not json", positive=FR_DOC),
    ]
    result = validate_examples(table_of(rows), cfg)
    assert reasons(result) == {rows[0]["example_id"]: "language_mismatch", rows[2]["example_id"]: "missing_negative"}
    detail = result.dropped.column("detail")[0].as_py()
    assert "English" in detail and "fr" in detail

    off = validate_examples(table_of(rows), cfg.model_copy(update={"check_language": False}))
    assert reasons(off) == {rows[2]["example_id"]: "missing_negative"}
    # the short text is only spared for its length: with a lower minimum it is checked and dropped
    low = validate_examples(table_of(rows[1:2]), cfg.model_copy(update={"language_min_chars": 20}))
    assert reasons(low) == {rows[1]["example_id"]: "language_mismatch"}


def test_bitext_checks_source_and_target_languages(cfg):
    good = make_example(0, "bitext")
    wrong_target = make_example(1, "bitext", placeholders=placeholders("bitext", "English", "French"))
    wrong_source = make_example(2, "bitext", placeholders=placeholders("bitext", "German", "German"))
    result = validate_examples(table_of([good, wrong_target, wrong_source]), cfg)
    assert reasons(result) == {
        wrong_target["example_id"]: "language_mismatch",
        wrong_source["example_id"]: "language_mismatch",
    }
    details = result.dropped.column("detail").to_pylist()
    assert details[0].startswith("positive:") and details[1].startswith("query:")


def test_kept_rows_keep_schema_and_order_and_dropped_rows_carry_stage(cfg):
    rows = []
    for i in range(30):
        t = list(GOOD)[i % len(GOOD)]
        rows.append(make_example(i, t, query="" if i % 4 == 0 else GOOD[t]["query"]))
    table = table_of(rows[::-1])  # ids descending: order must be kept as given
    result = validate_examples(table, cfg)
    assert result.kept.schema == table.schema
    expected = [r["example_id"] for r in rows[::-1] if r["query"]]
    assert result.kept.column("example_id").to_pylist() == expected
    assert result.dropped.schema.equals(DROPPED_SCHEMA)
    assert result.dropped.num_rows == 8
    assert set(result.dropped.column("stage").to_pylist()) == {"validate"}
    assert set(result.dropped.column("reason").to_pylist()) == {"empty_query"}
    assert set(result.dropped.column("run_id").to_pylist()) == {"run-v"}
    # deterministic
    again = validate_examples(table, cfg)
    assert again.kept.equals(result.kept) and again.dropped.equals(result.dropped)


def test_empty_table(cfg):
    result = validate_examples(table_of([]), cfg)
    assert result.kept.num_rows == 0 and result.dropped.num_rows == 0
    assert result.kept.schema == EXAMPLE_SCHEMA


@pytest.mark.parametrize(
    "text",
    [
        "Renewable energy reduces greenhouse gas emissions and improves air quality in cities.",
        "可再生能源可以减少温室气体排放，并改善城市的空气质量，这对公众健康非常重要。",
        "नवीकरणीय ऊर्जा ग्रीनहाउस गैस उत्सर्जन को कम करती है और शहरों में वायु गुणवत्ता में सुधार करती है।",
        "f(x) = 3x^2 + 2x - 1, so f'(x) = 6x + 2 and f''(x) = 6.",
        "The results for 2019, 2020 and 2021 were 45.3%, 47.1% and 52.8% respectively.",
        "Yes, yes, yes, I know, but we still need to talk about the budget for next year.",
        "1.1",
        EN_DOC * 3,
        prose(3000, seed=3),
    ],
)
def test_natural_text_is_not_degenerate(text):
    assert degenerate_detail(text) is None


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("...!!!", "no letter or digit"),
        ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "distinct characters"),
        ("1234 5678 9012 3456 7890 1234 5678", "letters"),
        ("spam eggs spam spam bacon spam spam spam spam ham spam spam", "tokens"),
        ("I love you. " * 20, "compresses"),
        ("Renewable energy reduces emissions. " + "and more and more and more " * 12, "compresses"),
    ],
)
def test_degenerate_text_is_caught(text, fragment):
    detail = degenerate_detail(text)
    assert detail is not None and fragment in detail


def test_language_names_map_to_iso_codes():
    assert language_code("English") == "en"
    assert language_code("chinese") == "zh"
    assert language_code("Swedish") == "sv"
    assert language_code("Klingon") is None
    assert language_code(None) is None


@pytest.mark.parametrize("task_type", list(GOOD))
def test_schema_and_validation_limits_agree(task_type, cfg):
    """What the JSON schema lets the model write is what validation keeps, at both ends of every field."""
    from prompts.task_types import get_task_type

    spec = get_task_type(task_type)
    rows, expected = [], {}
    for role, key in zip(("query", "positive", "negative"), spec.field_map, strict=True):
        if key is None:
            continue
        field = spec.schema["properties"][key]
        for length, verdict in (
            (field["maxLength"], None),
            (field["maxLength"] + 1, f"{role}_too_long"),
            (field["minLength"], None),
            (field["minLength"] - 1, f"{role}_too_short" if field["minLength"] > 1 else None),
        ):
            if length < 1:
                continue
            text = (prose(length // 4 + 5, seed=len(rows)) * 2)[:length]
            text = text[:-1] + "x" if text.endswith(" ") else text  # no edge space: trimmed lengths must match
            row = make_example(len(rows), task_type, **{role: text})
            rows.append(row)
            expected[row["example_id"]] = verdict
    got = reasons(validate_examples(table_of(rows), cfg.model_copy(update={"check_language": False})))
    length_reasons = {i: r for i, r in got.items() if r.endswith(("_too_long", "_too_short"))}
    assert length_reasons == {i: v for i, v in expected.items() if v is not None}
