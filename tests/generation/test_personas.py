"""Persona sources (seed set, JSONL files, the Hub), persona ids and seeded persona sampling (reading and
checking persona files: ``test_persona_files.py``)."""

from __future__ import annotations

import random
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
)
from support.persona_files import TEXTS, write_jsonl

HUB = {"hub_repo": "proj-persona/PersonaHub", "hub_file": "persona.jsonl"}


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
