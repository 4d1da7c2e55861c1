"""Choose ``generation.intent_threshold``: how well one cosine threshold separates paraphrases from
distinct sentences, measured on real human-scored pairs (the bundled STS Benchmark test split).

Pairs scored >= 4.5 (of 5) are paraphrases, pairs scored < 2.5 are distinct; the pairs in between are
left out. Both sides of each pair are embedded with the project's embedder (all-MiniLM-L6-v2 by
default, ``clean.*`` settings), and for each threshold a pair "is one intent" when its cosine is at or
above it. Printed per threshold: precision, recall and F1 of "same intent" against the paraphrase
label, and the threshold with the best F1. Intent dedup wants precision first (merging two different
intents loses one; missing a paraphrase only keeps a near-repeat), so the default is the lowest
threshold whose precision is at least ``--min-precision``.

    .venv/bin/python bench/intent_threshold.py [--lang en] [--min-precision 0.9]
    .venv/bin/python bench/intent_threshold.py --run RUN_ID   # a real run: distinct strings vs intents

With ``--run``, it reads the run's brainstorm table instead and prints, per task type, the distinct
instructions after text normalization and the intents they form at ``generation.intent_threshold``
(the same greedy clustering the brainstorm uses, over every brainstormed instruction, in order).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ground.settings import load_settings  # noqa: E402
from llm.embedder import make_embedder  # noqa: E402
from storage.shards import RunStore  # noqa: E402
from tasks.generation.intents import cluster_intents  # noqa: E402
from tasks.training.eval_data import bundled_sts_dir, load_sts  # noqa: E402

PARAPHRASE_MIN = 4.5
DISTINCT_BELOW = 2.5
THRESHOLDS = [round(float(t), 3) for t in np.arange(0.50, 0.96, 0.025)]


def labelled_pairs(lang: str) -> tuple[list[str], list[str], np.ndarray]:
    """The STS-B test pairs that are clearly paraphrases (label 1) or clearly distinct (label 0)."""
    s1, s2, scores = load_sts(bundled_sts_dir(), lang)
    keep = [i for i, s in enumerate(scores) if s >= PARAPHRASE_MIN or s < DISTINCT_BELOW]
    return [s1[i] for i in keep], [s2[i] for i in keep], (scores[keep] >= PARAPHRASE_MIN).astype(np.int8)


def sweep(similarity: np.ndarray, label: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(threshold, precision, recall, F1) of ``similarity >= threshold`` against ``label``."""
    out = []
    for t in THRESHOLDS:
        same = similarity >= t
        tp = int(np.sum(same & (label == 1)))
        precision = tp / int(same.sum()) if same.any() else 1.0
        recall = tp / int(label.sum())
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append((t, precision, recall, f1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lang", default="en", help="STS-B language file to use (default: en)")
    parser.add_argument("--min-precision", type=float, default=0.9, help="precision the default must reach")
    parser.add_argument("--run", help="a generation run id: its distinct instruction strings vs intents")
    args = parser.parse_args()
    if args.run:
        return run_intents(args.run)
    a, b, label = labelled_pairs(args.lang)
    embedder = make_embedder(load_settings().clean)
    started = time.monotonic()
    va, vb = embedder.encode(a), embedder.encode(b)
    similarity = np.sum(va * vb, axis=1)
    print(
        f"STS-B {args.lang} test: {int(label.sum())} paraphrase pairs (score >= {PARAPHRASE_MIN}), "
        f"{int((label == 0).sum())} distinct pairs (score < {DISTINCT_BELOW}); embedder {embedder.model_key}, "
        f"{2 * len(a)} texts in {time.monotonic() - started:.1f}s"
    )
    print(
        f"cosine: paraphrases median {np.median(similarity[label == 1]):.3f}, "
        f"distinct median {np.median(similarity[label == 0]):.3f}"
    )
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6}")
    rows = sweep(similarity, label)
    for t, p, r, f in rows:
        print(f"{t:>9.3f} {p:>9.3f} {r:>7.3f} {f:>6.3f}")
    best = max(rows, key=lambda row: row[3])
    print(f"best F1: {best[3]:.3f} at threshold {best[0]:.3f} (precision {best[1]:.3f}, recall {best[2]:.3f})")
    precise = [row for row in rows if row[1] >= args.min_precision]
    if precise:
        t, p, r, f = precise[0]
        print(f"lowest threshold with precision >= {args.min_precision}: {t:.3f} (recall {r:.3f}, F1 {f:.3f})")


def run_intents(run_id: str) -> None:
    settings = load_settings()
    rows = RunStore.from_settings(settings, run_id).read_kind("brainstorm").to_pylist()
    seen: dict[tuple[str, str], str] = {}  # first wording of each normalized string, in brainstorm order
    for row in rows:
        seen.setdefault((row["task_type"], " ".join(row["instruction"].lower().split())), row["instruction"])
    types, texts = [t for t, _ in seen], list(seen.values())
    threshold = settings.generation.intent_threshold or 1.0
    intents = cluster_intents(types, make_embedder(settings.clean).encode(texts), threshold)
    print(f"run {run_id}: {len(rows)} brainstormed instructions; intents at cosine >= {threshold}")
    print(f"{'task type':<16} {'distinct strings':>16} {'intents':>8}")
    for t in sorted(set(types)):
        ids = {intents.intent[i] for i, x in enumerate(types) if x == t}
        print(f"{t:<16} {types.count(t):>16} {len(ids):>8}")


if __name__ == "__main__":
    main()
