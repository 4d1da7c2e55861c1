"""Persona sources (seed set, JSONL files, the Hub) and seeded persona sampling."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from ground.settings import PersonaSettings
from personas.sampling import PersonaSampler
from personas.sources import (
    PersonaFileError,
    download_persona_hub,
    load_persona_pool,
    load_personas,
    make_persona,
    normalize_persona,
    persona_id,
    read_persona_file,
    read_persona_jsonl,
    truncate_persona,
)

HUB = {"hub_repo": "proj-persona/PersonaHub", "hub_file": "persona.jsonl"}

TEXTS = [
    "A beekeeper in rural Slovenia who writes poetry about pollinators.",
    "A Brazilian data journalist covering deforestation in the Amazon.",
    "A retired train conductor from Kyoto who restores antique clocks.",
    "A Nigerian fintech founder building payment rails for small farmers.",
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def assert_names_file(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert path.name in message, message
    return message


# --- reading files -------------------------------------------------------------------------------


def test_reads_a_good_file_in_order(tmp_path):
    path = write_jsonl(tmp_path / "personas.jsonl", [{"persona": t} for t in TEXTS])
    personas = read_persona_jsonl(path)
    assert [p.text for p in personas] == TEXTS
    assert len({p.persona_id for p in personas}) == len(TEXTS)
    assert all(p.persona_id == persona_id(p.text) for p in personas)


def test_extra_keys_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "personas.jsonl"
    path.write_text(
        "\n" + json.dumps({"persona": TEXTS[0], "source": "x"}) + "\n\n   \n" + json.dumps({"persona": TEXTS[1]}),
        encoding="utf-8",
    )
    assert [p.text for p in read_persona_jsonl(path)] == TEXTS[:2]


def test_duplicate_lines_are_deduped_first_wins(tmp_path):
    records = [
        {"persona": TEXTS[0]},
        {"persona": TEXTS[1]},
        {"persona": TEXTS[0]},  # exact duplicate
        {"persona": "  " + TEXTS[1].upper().replace(" ", "   ") + " "},  # same after normalization
        {"persona": TEXTS[2]},
    ]
    path = write_jsonl(tmp_path / "dupes.jsonl", records)
    personas = read_persona_jsonl(path)
    assert [p.text for p in personas] == [TEXTS[0], TEXTS[1], TEXTS[2]]


def test_persona_text_whitespace_is_collapsed(tmp_path):
    path = write_jsonl(tmp_path / "ws.jsonl", [{"persona": "  A   chef\tin\nLyon  "}])
    (persona,) = read_persona_jsonl(path)
    assert persona.text == "A chef in Lyon"


def test_limit_counts_unique_personas(tmp_path):
    records = [{"persona": TEXTS[0]}, {"persona": TEXTS[0]}, {"persona": TEXTS[1]}, {"persona": TEXTS[2]}]
    path = write_jsonl(tmp_path / "limit.jsonl", records)
    assert [p.text for p in read_persona_jsonl(path, limit=2)] == TEXTS[:2]
    assert len(read_persona_jsonl(path, limit=100)) == 3


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    assert_names_file(exc, path)


def test_folder_instead_of_file(tmp_path):
    path = tmp_path / "a_folder.jsonl"
    path.mkdir()
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    assert_names_file(exc, path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    assert_names_file(exc, path)


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        json.dumps({"persona": TEXTS[0]}) + "\n" + json.dumps({"persona": TEXTS[1]}) + "\n" + '{"persona": "oops\n'
    )
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    message = assert_names_file(exc, path)
    assert re.search(r"(:|line )3\b", message), message


@pytest.mark.parametrize(
    "record",
    [
        {"name": "no persona key"},
        {"persona": ""},
        {"persona": "   "},
        {"persona": 7},
        {"persona": None},
        ["persona", "in a list"],
        "just a string",
    ],
)
def test_line_without_usable_persona_names_the_line(tmp_path, record):
    path = write_jsonl(tmp_path / "nokey.jsonl", [{"persona": TEXTS[0]}, record])
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    message = assert_names_file(exc, path)
    assert re.search(r"(:|line )2\b", message), message


@pytest.mark.parametrize(
    "payload",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd",
        '{"persona": "Un caf\u00e9 owner in Paris."}\n'.encode("latin-1"),
    ],
)
def test_binary_or_non_utf8_file(tmp_path, payload):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(payload)
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    assert_names_file(exc, path)


def test_persona_file_error_is_a_value_error():
    assert issubclass(PersonaFileError, ValueError)


# --- Hub-scale files: bad lines and over-long personas --------------------------------------------


def _big_file_with_bad_lines(path: Path, good: int = 3000) -> tuple[Path, list[int]]:
    """``good`` distinct personas with three kinds of bad line in the middle; returns the bad line numbers."""
    lines = [json.dumps({"persona": f"A cartographer number {i} who maps rivers."}).encode() for i in range(good)]
    bad = {1000: b'{"persona": "cut off', 1800: b'{"name": "no persona key"}', 2500: b'{"persona": "caf\xe9"}'}
    for at, line in sorted(bad.items()):
        lines.insert(at, line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, [at + 1 for at in sorted(bad)]


def test_a_bad_line_in_the_middle_refuses_the_file_by_default(tmp_path):
    path, bad = _big_file_with_bad_lines(tmp_path / "hub.jsonl")
    with pytest.raises(PersonaFileError) as exc:
        read_persona_jsonl(path)
    message = assert_names_file(exc, path)
    assert f":{bad[0]}: not valid JSON" in message
    with pytest.raises(PersonaFileError, match=f":{bad[0]}:"):
        load_persona_pool(PersonaSettings(source=str(path)))


def test_bad_lines_are_skipped_and_counted_when_asked(tmp_path):
    path, bad = _big_file_with_bad_lines(tmp_path / "hub.jsonl")
    load = load_persona_pool(PersonaSettings(source=str(path), skip_bad_lines=True))
    assert len(load.personas) == 3000
    assert load.personas[-1].text == "A cartographer number 2999 who maps rivers."
    assert load.bad_lines == 3 and load.too_long == 0
    assert f"hub.jsonl:{bad[0]}: not valid JSON" in load.first_bad
    assert load.notes() == [f"skipped 3 bad lines (first: {load.first_bad})"]


def test_a_non_utf8_line_is_named_with_its_line_and_file_offset(tmp_path):
    path = tmp_path / "mixed.jsonl"
    content = b'{"persona": "a pilot"}\n{"persona": "caf\xe9"}\n'
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    with pytest.raises(PersonaFileError, match=rf":2: not UTF-8 text \(byte {offset}\)"):
        read_persona_jsonl(path)
    assert read_persona_file(path, skip_bad_lines=True).bad_lines == 1


def test_a_file_of_only_bad_lines_is_refused_even_when_skipping(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"<html>\nrate limited\n</html>\n")
    with pytest.raises(PersonaFileError, match=r"no personas in file \(skipped 3 bad lines"):
        read_persona_file(path, skip_bad_lines=True)


def test_skipped_lines_do_not_count_towards_the_limit(tmp_path):
    path, _ = _big_file_with_bad_lines(tmp_path / "hub.jsonl")
    load = read_persona_file(path, limit=2000, skip_bad_lines=True)
    assert len(load.personas) == 2000 and load.bad_lines == 2  # the third bad line lies past the limit


LONG = "A marine biologist who " + " ".join(f"studied reef number {i}," for i in range(40)) + " and now teaches."


def test_an_over_long_persona_is_truncated_at_a_word_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"persona": TEXTS[0]}, {"persona": LONG}, {"persona": TEXTS[1]}])
    load = load_persona_pool(PersonaSettings(source=str(path), max_chars=200))
    short, cut, other = load.personas
    assert (short.text, other.text) == (TEXTS[0], TEXTS[1])
    assert len(LONG) > 200 >= len(cut.text) > 150
    assert LONG.startswith(cut.text) and LONG[len(cut.text)] == " "
    assert cut.persona_id == persona_id(cut.text)
    assert load.too_long == 1 and load.notes() == ["truncated 1 over-long persona"]


def test_an_over_long_persona_can_be_skipped_instead(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"persona": LONG}, {"persona": TEXTS[2]}, {"persona": LONG + "!"}])
    load = load_persona_pool(PersonaSettings(source=str(path), max_chars=200, too_long="skip"))
    assert [p.text for p in load.personas] == [TEXTS[2]]
    assert load.notes() == ["skipped 2 over-long personas"]


def test_no_limit_keeps_long_personas_whole(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"persona": LONG}])
    load = load_persona_pool(PersonaSettings(source=str(path), max_chars=None))
    assert [p.text for p in load.personas] == [LONG] and load.notes() == []


def test_truncate_without_a_space_cuts_hard():
    assert truncate_persona("x" * 300, 120) == "x" * 120
    assert truncate_persona("short", 120) == "short"
    assert truncate_persona("word " * 50, 52).endswith("word") and len(truncate_persona("word " * 50, 52)) <= 52


def test_defaults_refuse_bad_lines_and_leave_the_seed_set_uncut():
    settings = PersonaSettings()
    assert settings.skip_bad_lines is False and settings.too_long == "truncate"
    load = load_persona_pool(settings)
    assert load.notes() == [] and len(load.personas) >= 300


# one persona-like sentence per script; the CJK ones need the most tokens per character
SCRIPTS = {
    "en": "A retired train conductor from Kyoto who restores antique clocks and teaches children about gears.",
    "de": "Eine pensionierte Lehrerin aus dem Schwarzwald, die alte Obstsorten kartiert und Kindern Veredeln zeigt.",
    "ru": "Бывшая учительница из Сибири, которая составляет карты старых сортов яблонь и учит детей прививке деревьев.",
    "ar": "مهندسة برمجيات من القاهرة تعمل على أدوات مفتوحة المصدر لتعليم البرمجة باللغة العربية للأطفال في الريف.",
    "zh": "一位来自四川的退休小学教师，业余时间绘制古老果树品种的地图，并教孩子们如何嫁接苹果树。",
    "ja": "京都出身の退職した鉄道車掌で、アンティーク時計の修理を趣味とし、子どもたちに機械の仕組みを教えている。",
}


def test_the_default_max_chars_fits_the_brainstorm_prompt_in_every_script():
    """A persona of ``max_chars`` characters in any of these scripts, as the system prompt of the longest
    brainstorm prompt, leaves ``brainstorm_max_tokens`` in the embedded model's context (else vLLM answers 400)."""
    from ground.settings import Settings
    from ground.task_types import ALL_TASK_TYPES
    from prompts.render import render_brainstorm
    from prompts.task_types import get_task_type

    settings = Settings()
    model_dir = settings.embedded_llm.model_dir
    if not (model_dir / "tokenizer.json").exists():
        pytest.skip(f"no converted model in {model_dir} (`embed-factory llm up` makes it)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_chars = settings.personas.max_chars
    specs = [get_task_type(t) for t in ALL_TASK_TYPES if get_task_type(t).brainstorms]

    def prompt_tokens(persona: str) -> int:
        """Tokens of the longest brainstorm prompt with this persona, as the server's chat template renders it."""
        texts = [
            tokenizer.apply_chat_template(
                render_brainstorm(spec, persona, settings.generation.instructions_per_brainstorm).messages,
                add_generation_prompt=True,
                tokenize=False,
            )
            for spec in specs
        ]
        return max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)

    budget = settings.embedded_llm.max_model_len - settings.llm.brainstorm_max_tokens
    print(f"\nbrainstorm prompt without persona: {prompt_tokens('')} tokens; budget {budget}")
    for script, sentence in SCRIPTS.items():
        persona = truncate_persona(" ".join([sentence] * (max_chars // len(sentence) + 1)), max_chars)
        assert max_chars - 120 < len(persona) <= max_chars
        used = prompt_tokens(persona)
        print(f"{script}: {len(persona)} chars -> prompt {used} tokens")
        assert used <= budget, f"{script}: {used} prompt tokens > {budget}"


# --- ids -----------------------------------------------------------------------------------------


def test_persona_id_ignores_case_and_spacing():
    assert persona_id("A Chef in  Lyon") == persona_id("  a chef\tin lyon ")
    assert persona_id("A chef in Lyon") != persona_id("A chef in Paris")
    assert make_persona(" A  chef ").persona_id == persona_id("a chef")
    assert normalize_persona("  A\nB  ") == normalize_persona("a b")


# --- sources -------------------------------------------------------------------------------------


def test_bundled_seed_set_has_at_least_300_unique_personas():
    personas = load_personas("seed", **HUB)
    assert len(personas) >= 300
    assert len({p.persona_id for p in personas}) == len(personas)
    assert len({normalize_persona(p.text) for p in personas}) == len(personas)
    assert all(p.text.strip() for p in personas)


def test_seed_limit():
    assert len(load_personas("seed", limit=5, **HUB)) == 5


def test_load_from_a_path(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"persona": t} for t in TEXTS])
    assert [p.text for p in load_personas(str(path), **HUB)] == TEXTS


def test_load_from_a_home_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "mine.jsonl", [{"persona": t} for t in TEXTS])
    assert [p.text for p in load_personas("~/mine.jsonl", **HUB)] == TEXTS


def test_load_from_a_missing_path_raises(tmp_path):
    with pytest.raises(PersonaFileError, match="gone.jsonl"):
        load_personas(str(tmp_path / "gone.jsonl"), **HUB)


def _fake_hub(monkeypatch, local: Path) -> list[dict]:
    import huggingface_hub

    calls: list[dict] = []

    def fake_hf_hub_download(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    return calls


def test_hub_source_downloads_the_dataset_file(tmp_path, monkeypatch):
    local = write_jsonl(tmp_path / "persona.jsonl", [{"persona": t} for t in TEXTS])
    calls = _fake_hub(monkeypatch, local)
    personas = load_personas(
        "hub", hub_repo="proj-persona/PersonaHub", hub_file="persona.jsonl", hub_revision="abc123", limit=3
    )
    assert [p.text for p in personas] == TEXTS[:3]
    assert len(calls) == 1
    call = calls[0]
    assert call["repo_type"] == "dataset"
    assert call.get("repo_id", call["args"][0] if call["args"] else None) == "proj-persona/PersonaHub"
    assert call.get("filename") == "persona.jsonl"
    assert call.get("revision") == "abc123"


def test_download_persona_hub_returns_a_path(tmp_path, monkeypatch):
    local = write_jsonl(tmp_path / "persona.jsonl", [{"persona": TEXTS[0]}])
    calls = _fake_hub(monkeypatch, local)
    path = download_persona_hub("someone/other-personas", "x.jsonl")
    assert isinstance(path, Path) and path == local
    assert calls[0]["repo_type"] == "dataset"
    assert calls[0]["repo_id"] == "someone/other-personas"


def test_hub_file_that_is_malformed_is_reported(tmp_path, monkeypatch):
    local = tmp_path / "persona.jsonl"
    local.write_text("<html>rate limited</html>\n")
    _fake_hub(monkeypatch, local)
    with pytest.raises(PersonaFileError, match="persona.jsonl"):
        load_personas("hub", **HUB)


# --- sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_pool():
    return load_personas("seed", **HUB)


def test_sampler_rejects_empty_pool():
    with pytest.raises(ValueError):
        PersonaSampler([], seed=1)


def test_sampler_draw_is_deterministic_for_a_seed(seed_pool):
    keys = [f"b000-retrieval-{i:06d}" for i in range(50)]
    a = PersonaSampler(seed_pool, seed=42)
    b = PersonaSampler(list(seed_pool), seed=42)
    assert [a.draw(k) for k in keys] == [b.draw(k) for k in keys]
    # drawing is stateless: order of calls does not matter
    assert [a.draw(k) for k in reversed(keys)] == list(reversed([b.draw(k) for k in keys]))


def test_sampler_is_independent_of_pool_order(seed_pool):
    shuffled = list(seed_pool)
    random.Random(3).shuffle(shuffled)
    assert shuffled != list(seed_pool)
    a = PersonaSampler(seed_pool, seed=7)
    b = PersonaSampler(shuffled, seed=7)
    keys = [f"k{i}" for i in range(60)]
    assert [a.draw(k) for k in keys] == [b.draw(k) for k in keys]
    assert a.sample(25, key="s") == b.sample(25, key="s")


def test_sampler_seed_and_key_matter(seed_pool):
    keys = [f"k{i}" for i in range(60)]
    a = PersonaSampler(seed_pool, seed=1)
    b = PersonaSampler(seed_pool, seed=2)
    assert [a.draw(k) for k in keys] != [b.draw(k) for k in keys]
    drawn = {a.draw(k).persona_id for k in keys}
    assert len(drawn) > 10  # different keys spread over the pool


def test_sampler_draws_come_from_the_pool(seed_pool):
    sampler = PersonaSampler(seed_pool, seed=9)
    ids = {p.persona_id for p in seed_pool}
    assert all(sampler.draw(f"x{i}").persona_id in ids for i in range(100))


def test_sampler_sample_gives_distinct_personas(seed_pool):
    sampler = PersonaSampler(seed_pool, seed=5)
    picked = sampler.sample(40)
    assert len(picked) == 40
    assert len({p.persona_id for p in picked}) == 40
    assert sampler.sample(40) == picked
    small = PersonaSampler(seed_pool[:3], seed=5)
    assert sorted(p.persona_id for p in small.sample(10)) == sorted(p.persona_id for p in seed_pool[:3])
