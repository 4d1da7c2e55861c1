"""The data funnel at production lengths: generate + validate + dedup + decontaminate at 2,000 examples
against the production-length double (``tests/support/prod_stub_llm.py``), each stage within its bound per
task type; and a run whose token budget cannot hold a type ends Failed with one line (flow state and CLI).

Bounds, per task type, on text that is clean by construction (the double copies no eval text):
generation parses >= 95 % of the target; validation keeps >= 90 % of the parsed rows; dedup keeps >= 90 %
(the double repeats ~4 % of its answers); decontamination drops <= 1 %; no bitext request asks for a
translation into its own language. ``bench/funnel.py`` prints the same funnel.
"""

from __future__ import annotations

import time

import pytest
from funnel import measure_funnel, print_funnel  # bench/funnel.py (pytest's pythonpath has bench/)

from prompts.task_types import TASK_TYPES

EXAMPLES = 2000


def test_funnel_at_production_lengths_stays_within_each_stage_bound(prefect_api_url, tmp_path, capsys):
    started = time.monotonic()
    result = measure_funnel(EXAMPLES, 42, tmp_path / "data", {"EMBED_FACTORY_LLM__CONTEXT_TOKENS": "32768"},
                            prefect_api_url)  # fmt: skip
    took = time.monotonic() - started
    with capsys.disabled():
        print(f"\nfunnel at {EXAMPLES} examples ({took:.0f} s):")
        print_funnel(result)
    assert result["failed"] is None, result["failed"]
    counts = result["counts"]
    assert set(counts) == set(TASK_TYPES), "every type generated"
    target = EXAMPLES // len(TASK_TYPES)
    for task_type, row in counts.items():
        why = f"{task_type}: {row}, {result['reasons'][task_type]}"
        assert row["decontaminated"] > 0, why
        assert row["parsed"] >= 0.95 * target, why
        assert row["valid"] >= 0.90 * row["parsed"], why
        assert row["deduped"] >= 0.90 * row["valid"], why
        assert row["decontaminated"] >= 0.99 * row["deduped"], why
    assert result["bitext_same_language"] == 0
    assert result["bitext_parsed"] > 0
    assert took < 240, f"the funnel took {took:.0f} s"


def test_a_context_that_cannot_hold_a_type_ends_the_run_failed_with_one_line(prefect_api_url, tmp_path):
    """A 1,024-token context leaves ~340 tokens for an answer: long_long's two 300-word documents cannot fit,
    every answer is cut, none is asked again at the same limit, and the flow run ends Failed naming it."""
    result = measure_funnel(60, 5, tmp_path / "data", {"EMBED_FACTORY_LLM__CONTEXT_TOKENS": "1024"}, prefect_api_url)
    failed = result["failed"]
    assert failed is not None and failed.startswith("FAILED: generation ended below 50% of the target for")
    assert "long_long 0/10 (top reject reason 'truncated at max_tokens" in failed, failed
    assert "raise llm.context_tokens" in failed
    assert "\n" not in failed
    assert result["truncated"] >= 10 and result["truncated"] <= result["requests"], "no retry at the same limit"


@pytest.mark.parametrize("context, code", [("1024", 1)])
def test_the_cli_exits_non_zero_with_the_line(prefect_api_url, tmp_path, context, code):
    from support.cli_process import cli
    from support.prod_stub_llm import ProdStubLLM

    with ProdStubLLM(seed=3) as stub:
        result = cli(
            "run", "--run-id", "budget", "-n", "12", "--no-clean", "-t", "long_long", "-t", "sts",
            env={
                "PREFECT_API_URL": prefect_api_url,
                "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"),
                "EMBED_FACTORY_LLM__BASE_URL": stub.base_url,
                "EMBED_FACTORY_LLM__MODEL": stub.model,
                "EMBED_FACTORY_LLM__CONTEXT_TOKENS": context,
                "EMBED_FACTORY_GENERATION__INTENT_THRESHOLD": "null",
            },
            timeout=300,
        )  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "long_long 0/6" in errors[0] and "sts" not in errors[0].split("target for")[1]
    assert "Traceback" not in result.stderr
