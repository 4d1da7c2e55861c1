"""Decontamination's false positives on clean production-length prose, and its recall on planted STS-B text.

Clean rows: the answers of ``tests/support/prod_stub_llm.py`` (running English prose with the phrases real
text has, and 17 other languages), as queries of 8-25 words and documents of 50-520 words, none copied from
an eval text. Eval texts: the bundled STS-B test splits of every ``finetune.sts_languages`` language.
Planted: STS-B English test sentences verbatim, as a prefix-extended or suffix-extended query, and inside
a 300-word document. Only the n-gram check runs (no embedder): the rule whose false positives issue 28 found.

    python bench/decontaminate.py [--rows 2000] [--seed 7]

The rule before issue 28 (>= 50 % of an eval text's trigrams anywhere in the text) is measured on the
same rows in the same run. ``tests/cleaning/test_decontaminate.py`` asserts the false-positive rate (<= 0.5 %).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from ground.settings import CleanSettings, load_settings  # noqa: E402
from support.prod_stub_llm import LANGUAGE_ORDER, prose  # noqa: E402
from tasks.cleaning.decontaminate import EvalIndex, EvalText, RowText, decontaminate, ngrams  # noqa: E402
from tasks.training.eval_data import bundled_sts_dir, load_sts  # noqa: E402


def clean_rows(n: int, seed: int) -> pa.Table:
    """``n`` rows of clean production-length text: half English (as the prompts' language weights), the rest
    spread over the other languages; a query of 8-25 words and a document of 50-520 words each."""
    rng = random.Random(seed)
    languages = [rng.choice(LANGUAGE_ORDER) if rng.random() >= 0.5 else "English" for _ in range(n)]
    return pa.table(
        {
            "example_id": [f"clean:{i:05d}" for i in range(n)],
            "run_id": ["clean"] * n,
            "task_type": ["retrieval"] * n,
            "query": [prose(lang, rng, rng.randint(8, 25)) for lang in languages],
            "positive": [prose(lang, rng, rng.choice([50, 100, 200, 300, 400]) * 13 // 10) for lang in languages],
        }
    )


def sts_eval_texts() -> list[EvalText]:
    texts = []
    for lang in load_settings().finetune.sts_languages:
        s1, s2, _ = load_sts(bundled_sts_dir(), lang)
        pairs = enumerate(zip(s1, s2, strict=True))
        texts += [EvalText(f"stsb-{lang}-test", row, t) for row, pair in pairs for t in pair]
    return texts


def planted_rows(n: int, seed: int) -> pa.Table:
    """STS-B English test sentences (>= 4 words) verbatim, extended, or inside a document."""
    rng = random.Random(seed)
    s1, _s2, _ = load_sts(bundled_sts_dir(), "en")
    sentences = [s for s in s1 if len(s.split()) >= 4]
    queries, positives = [], []
    for i in range(n):
        sentence = rng.choice(sentences)
        kind = i % 3
        if kind == 0:
            queries.append(sentence)
        elif kind == 1:
            queries.append("Someone wrote that " + sentence[0].lower() + sentence[1:] + " today")
        else:
            queries.append(prose("English", rng, 12))
        doc = prose("English", rng, 300).split(". ")
        if kind == 2:
            doc.insert(len(doc) // 2, sentence.rstrip("."))
        positives.append(". ".join(doc))
    return pa.table(
        {
            "example_id": [f"planted:{i:05d}" for i in range(n)],
            "run_id": ["planted"] * n,
            "task_type": ["retrieval"] * n,
            "query": queries,
            "positive": positives,
        }
    )


def legacy_dropped(table: pa.Table, eval_texts: list[EvalText]) -> int:
    """Rows the rule before issue 28 dropped: >= 50 % of an eval text's trigrams anywhere in the row's text."""
    index = EvalIndex.build(eval_texts, 3)
    dropped = 0
    for query, positive in zip(table["query"].to_pylist(), table["positive"].to_pylist(), strict=True):
        for text in (query, positive):
            grams = ngrams(text, 3)
            row = RowText(text)
            if any(
                len(index.evidence[i].grams & grams) >= 0.5 * len(index.evidence[i].grams)
                for i in index.candidates(row)
                if index.evidence[i].n == 3
            ):
                dropped += 1
                break
    return dropped


def false_positives(rows: int, seed: int) -> tuple[int, int, Counter]:
    """(clean rows dropped, rows, matched eval texts) with the n-gram check alone."""
    result = decontaminate(clean_rows(rows, seed), sts_eval_texts(), CleanSettings(decontaminate_similarity=None))
    details = Counter(d.split(" (")[0].split(" matches ")[1] for d in result.dropped["detail"].to_pylist())
    return result.dropped.num_rows, rows, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    started = time.monotonic()
    dropped, rows, details = false_positives(args.rows, args.seed)
    took = time.monotonic() - started
    print(f"clean production-length rows dropped: {dropped}/{rows} = {dropped / rows:.2%} ({took:.0f} s)")
    for matched, count in details.most_common(5):
        print(f"  {count} x {matched}")
    evals = sts_eval_texts()
    legacy = legacy_dropped(clean_rows(args.rows, args.seed), evals)
    print(f"  the rule before (>= 50 % of an eval text's trigrams anywhere): {legacy}/{rows} = {legacy / rows:.2%}")
    planted = planted_rows(300, args.seed)
    result = decontaminate(planted, evals, CleanSettings(decontaminate_similarity=None))
    print(
        f"planted STS-B sentences caught by the n-gram check: {result.dropped.num_rows}/{planted.num_rows} "
        f"(the rule before: {legacy_dropped(planted, evals)}/{planted.num_rows})"
    )


if __name__ == "__main__":
    main()
