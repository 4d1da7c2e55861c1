"""The data funnel against a production-length LLM double: generate, then validate, dedup, decontaminate.

Runs the ``generate`` flow (Prefect's test harness, in-process) against ``tests/support/prod_stub_llm.py``
(answers at the lengths and in the languages the prompts ask for, ~1 % non-JSON, ~4 % duplicates), then the
cleaning stages' own functions on its examples: validation, exact + near dedup, and decontamination
against the bundled STS-B test splits (n-gram check; the embedding check needs an embedder and is left
out here). Prints per task type: requests, parsed, valid, deduped, decontaminated, the top drop reason
of each stage, and bitext requests that asked for a translation into the same language.

    python bench/funnel.py --examples 2000 [--seed 42] [--max-tokens 1024] [--context 32768]

``tests/generation/test_funnel.py`` runs :func:`measure_funnel` and asserts the bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.prod_stub_llm import ProdStubLLM  # noqa: E402

STAGES = ("requests", "parsed", "valid", "deduped", "decontaminated")


def _by_type(table: pa.Table) -> Counter:
    return Counter(table["task_type"].to_pylist()) if table.num_rows else Counter()


def _top_reason(dropped: pa.Table, task_type: str) -> str:
    rows = [(r["reason"], r.get("detail")) for r in dropped.to_pylist() if r["task_type"] == task_type]
    if not rows:
        return ""
    reason, n = Counter(r for r, _ in rows).most_common(1)[0]
    return f"{reason} x{n}"


def measure_funnel(
    examples: int, seed: int, data_dir: Path, env: dict[str, str] | None = None, prefect_api_url: str | None = None
) -> dict:
    """Generate ``examples`` against a fresh production-length stub and clean them; the funnel per type.
    ``prefect_api_url``: an API to use (tests); None: Prefect's test harness, started here."""
    import contextlib

    from prefect.testing.utilities import prefect_test_harness

    saved = dict(os.environ)
    try:
        with ProdStubLLM(seed=seed) as stub:
            os.environ.update(
                {
                    "EMBED_FACTORY_STORAGE__DATA_DIR": str(data_dir),
                    "EMBED_FACTORY_LLM__BASE_URL": stub.base_url,
                    "EMBED_FACTORY_LLM__MODEL": stub.model,
                    "EMBED_FACTORY_GENERATION__INTENT_THRESHOLD": "null",
                    "EMBED_FACTORY_GENERATION__SHARD_SIZE": "500",
                    "EMBED_FACTORY_PERSONAS__EXPAND_ROUNDS": "0",
                    # as the production profile: each request and retry its own sample
                    "EMBED_FACTORY_LLM__SEND_SEED": "true",
                    **(env or {}),
                }
            )
            if prefect_api_url:
                os.environ["PREFECT_API_URL"] = prefect_api_url
            from flows.generate import generate
            from ground.settings import load_settings

            started = time.monotonic()
            harness = contextlib.nullcontext() if prefect_api_url else prefect_test_harness(server_startup_timeout=120)
            with harness:
                state = asyncio.run(generate(run_id="funnel", examples=examples, seed=seed, return_state=True))
            try:
                summary, failed = state.result(), None
            except Exception as exc:  # the run ended Failed (a type far below its target): its shards stay
                summary, failed = None, f"{state.type.value}: {exc}"
            generate_s = time.monotonic() - started
            truncated = stub.truncated
        funnel = clean_funnel(load_settings(), data_dir)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {**funnel, "generate_s": generate_s, "truncated": truncated, "summary": summary, "failed": failed}


def clean_funnel(settings, data_dir: Path) -> dict:
    """Validate, dedup and decontaminate the run's examples with the stages' functions; counts per type."""
    from flows.eval_texts import gather_eval_texts
    from storage.shards import RunStore
    from tasks.cleaning.decontaminate import decontaminate
    from tasks.cleaning.dedup import exact_dedup, merge_near_parts, near_dedup_part, split_by_task_type
    from tasks.cleaning.validate import validate_examples

    cfg = settings.clean
    store = RunStore(data_dir, "funnel")
    parsed, rejects = store.read_kind("examples"), store.read_kind("rejects")
    started = time.monotonic()
    valid = validate_examples(parsed, cfg)
    exact = exact_dedup(valid.kept)
    parts = split_by_task_type(exact.kept)
    near = merge_near_parts(exact.kept, [near_dedup_part(part, cfg) for part in parts.values()])
    dedup_dropped = pa.concat_tables([exact.dropped, near.dropped])
    clean = decontaminate(near.kept, gather_eval_texts(settings), cfg.model_copy(), None)
    clean_s = time.monotonic() - started
    tables = {"parsed": parsed, "valid": valid.kept, "deduped": near.kept, "decontaminated": clean.kept}
    types = sorted(set(_by_type(parsed)) | set(_by_type(rejects)))
    counts = {t: {"requests": _by_type(parsed)[t] + _by_type(rejects)[t]} for t in types}
    for stage, table in tables.items():
        by_type = _by_type(table)
        for t in types:
            counts[t][stage] = by_type[t]
    reasons = {
        t: {
            "generate": _top_reason(rejects, t),
            "validate": _top_reason(valid.dropped, t),
            "dedup": _top_reason(dedup_dropped, t),
            "decontaminate": _top_reason(clean.dropped, t),
        }
        for t in types
    }
    same_language = 0
    requested = [*parsed.to_pylist(), *rejects.to_pylist()] if rejects.num_rows else parsed.to_pylist()
    bitext_rows = [r for r in parsed.to_pylist() if r["task_type"] == "bitext"]
    for row in bitext_rows:
        values = json.loads(row["placeholders"])
        same_language += values.get("src_lang") == values.get("tgt_lang")
    return {
        "counts": counts,
        "reasons": reasons,
        "bitext_same_language": same_language,
        "bitext_parsed": len(bitext_rows),
        "requests": len(requested),
        "decontaminate_details": Counter(d.split(" (")[0] for d in clean.dropped["detail"].to_pylist()).most_common(3),
        "clean_s": clean_s,
    }


def print_funnel(result: dict) -> None:
    print(f"{'task type':<15}" + "".join(f"{s:>15}" for s in STAGES))
    totals = Counter()
    for t, row in result["counts"].items():
        print(f"{t:<15}" + "".join(f"{row[s]:>15}" for s in STAGES))
        totals.update(row)
    print(f"{'total':<15}" + "".join(f"{totals[s]:>15}" for s in STAGES))
    for t, reasons in result["reasons"].items():
        shown = "; ".join(f"{stage}: {r}" for stage, r in reasons.items() if r)
        print(f"  {t}: {shown}")
    print(
        f"bitext rows asking for the same language: {result['bitext_same_language']} of {result['bitext_parsed']}; "
        f"answers cut at max_tokens: {result.get('truncated')}; decontamination matches: "
        f"{result['decontaminate_details']}"
    )
    print(f"generate {result.get('generate_s', 0):.0f} s, clean stages {result['clean_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-tokens", type=int, default=None, help="llm.max_tokens (default: the profile's)")
    parser.add_argument("--context", type=int, default=None, help="llm.context_tokens (default: unbounded)")
    args = parser.parse_args()
    env = {"EMBED_FACTORY_LLM__MAX_TOKENS": str(args.max_tokens)} if args.max_tokens else {}
    if args.context:
        env["EMBED_FACTORY_LLM__CONTEXT_TOKENS"] = str(args.context)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_funnel(args.examples, args.seed, Path(tmp) / "data", env)
    summary = result.pop("summary")
    print(f"{args.examples} examples, seed {args.seed}: {getattr(summary, 'llm_calls', None)} LLM calls")
    if result["failed"]:
        print(f"the generate flow run ended {result['failed']}")
    print_funnel(result)


if __name__ == "__main__":
    main()
