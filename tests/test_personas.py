"""Persona sources (seed set, JSONL files, the Hub) and seeded persona sampling."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from personas.sampling import PersonaSampler
from personas.sources import (
    PersonaFileError,
    download_persona_hub,
    load_personas,
    make_persona,
    normalize_persona,
    persona_id,
    read_persona_jsonl,
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
    [{"name": "no persona key"}, {"persona": ""}, {"persona": "   "}, {"persona": 7}, {"persona": None},
     ["persona", "in a list"], "just a string"],
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
    personas = load_personas("hub", hub_repo="proj-persona/PersonaHub", hub_file="persona.jsonl",
                             hub_revision="abc123", limit=3)
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
