"""Reading persona JSONL files: good files, every kind of bad file or line (each named with its line),
Hub-scale files with bad lines skipped and counted, and over-long personas truncated or skipped.
Sources, ids and sampling: ``test_personas.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ground.settings import PersonaSettings
from personas.sources import (
    PersonaFileError,
    load_persona_pool,
    persona_id,
    read_persona_file,
    read_persona_jsonl,
    truncate_persona,
)
from support.persona_files import TEXTS, write_jsonl


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
