"""How well the LLM judge (tasks/cleaning/judge.py) spots false negatives, on real pairs no one here wrote.

From the STS Benchmark English test split bundled with the project (``tasks/training/data``), pairs scored
>= 4.5 (near paraphrases by human rating) become (query, positive). Each sample gets ``--negatives`` true
negatives: sentence2 of low-scoring pairs (<= 1.0) of *other* sentences. Into a share ``--plant`` of the
samples one true paraphrase is planted among the negatives: the sentence2 of another >= 4.5 pair with the
same sentence1 when the split has one, else the positive lightly edited (``light_edit``). Every pair goes
through the judge's own prompt and client (``judge_pair``, ``LLMClient.from_settings``) against the
configured endpoint (default: the embedded vLLM server, SmolLM2-135M here), and the bench prints the
precision and recall of the "relevant" verdicts among the negatives (planted = relevant), the same with
"partially_relevant" counted as relevant, and how often the gold positive itself is judged relevant.

    .venv/bin/python bench/judge_quality.py --samples 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter, defaultdict

from ground.settings import load_settings
from llm.client import LLMClient, Sampling
from prompts.judge import JUDGE_PROMPT_VERSION
from prompts.task_types import get_task_type
from tasks.cleaning.judge import Ask, judge_pair
from tasks.training.eval_data import bundled_sts_dir, load_sts


def light_edit(sentence: str) -> str:
    """A paraphrase by small surface edits: no final period, another determiner, "is" contracted; else lowercased."""
    base = sentence.rstrip(" .")
    words = base.split()
    swaps = {"A": "One", "An": "One", "The": "This", "a": "one", "the": "this"}
    if words and words[0] in swaps:
        words[0] = swaps[words[0]]
    text = " ".join(words).replace(" is ", "'s ", 1)
    return text if text != base else base.lower()


def build_samples(samples: int, negatives: int, plant: float, seed: int) -> list[dict]:
    s1, s2, scores = load_sts(bundled_sts_dir(), "en")
    high = [(a, b) for a, b, s in zip(s1, s2, scores, strict=True) if s >= 4.5]
    low = [(a, b) for a, b, s in zip(s1, s2, scores, strict=True) if s <= 1.0]
    paraphrases = defaultdict(list)
    for a, b in high:
        paraphrases[a].append(b)
    rng = random.Random(seed)
    chosen = rng.sample(high, min(samples, len(high)))
    out = []
    for query, positive in chosen:
        pool = [b for a, b in low if a != query and b not in paraphrases[query]]
        cands = [(text, False, "low_score") for text in rng.sample(pool, negatives)]
        if rng.random() < plant:
            others = [b for b in paraphrases[query] if b != positive]
            planted = (rng.choice(others), "other_pair") if others else (light_edit(positive), "edited_positive")
            cands.insert(rng.randrange(len(cands) + 1), (planted[0], True, planted[1]))
        out.append({"query": query, "positive": positive, "candidates": cands})
    return out


def prf(pairs: list[tuple[bool, bool]]) -> dict[str, float | int]:
    """Precision, recall and F1 of the predicted "relevant" against the truth, from (truth, predicted) pairs."""
    tp = sum(t and p for t, p in pairs)
    fp = sum(p and not t for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "f1": round(f1, 3),
    }


async def judge_all(samples: list[dict], settings, max_tokens: int) -> tuple[list[tuple[Ask, bool, str, str]], dict]:
    instruction = get_task_type("sts").fixed_instruction
    asks: list[tuple[Ask, bool, str]] = []
    for i, s in enumerate(samples):
        asks.append((Ask(f"s{i}", "sts", instruction, s["query"], s["positive"], 1, "positive"), True, "positive"))
        for j, (text, truth, kind) in enumerate(s["candidates"]):
            asks.append((Ask(f"s{i}", "sts", instruction, s["query"], text, 51 + j, "negative"), truth, kind))
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    async with LLMClient.from_settings(settings) as client:
        verdicts = await asyncio.gather(*(judge_pair(client, a, sampling, settings.clean.seed) for a, _, _ in asks))
        stats = {"requests": client.stats.requests, "failed": client.stats.failed}
        stats["completion_tokens"] = client.stats.completion_tokens
    return [(a, t, k, v) for (a, t, k), (v, _) in zip(asks, verdicts, strict=True)], stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40, help="(query, positive) pairs scored >= 4.5")
    parser.add_argument("--negatives", type=int, default=6, help="low-scoring negatives per sample")
    parser.add_argument("--plant", type=float, default=0.5, help="share of samples with a planted paraphrase")
    parser.add_argument("--max-tokens", type=int, default=128, help="judge answer cap (reason + verdict)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    settings = load_settings()
    samples = build_samples(args.samples, args.negatives, args.plant, args.seed)
    started = time.monotonic()
    results, stats = asyncio.run(judge_all(samples, settings, args.max_tokens))
    seconds = time.monotonic() - started
    negs = [(t, v) for a, t, _, v in results if a.role == "negative" and v != "error"]
    positives = [v for a, _, _, v in results if a.role == "positive"]
    by_kind = Counter((k, v) for a, _, k, v in results)
    report = {
        "model": settings.llm_model,
        "prompt_version": JUDGE_PROMPT_VERSION,
        "samples": len(samples),
        "negatives_judged": len(negs),
        "planted": sum(t for t, _ in negs),
        "relevant_among_negatives": prf([(t, v == "relevant") for t, v in negs]),
        "relevant_or_partial_among_negatives": prf([(t, v in ("relevant", "partially_relevant")) for t, v in negs]),
        "gold_positive_judged_relevant": round(positives.count("relevant") / max(1, len(positives)), 3),
        "verdicts_by_kind": {f"{k}/{v}": n for (k, v), n in sorted(by_kind.items())},
        "errors": sum(v == "error" for *_, v in results),
        "client": stats,
        "seconds": round(seconds, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=1))
    r = report["relevant_among_negatives"]
    print(
        f"judge {settings.llm_model}: 'relevant' among negatives: precision {r['precision']}, recall {r['recall']} "
        f"({report['planted']} planted paraphrases, {len(negs)} negatives judged); gold positives judged "
        f"relevant: {report['gold_positive_judged_relevant']}; {seconds:.0f}s at load {report['load_average'][0]}"
    )


if __name__ == "__main__":
    main()
