"""Generated text is data: SQL-injection text round-trips through the shards, the DuckDB catalog, dedup
and `embed-factory query`; persona and model text with HTML is escaped in the report; no project code
builds SQL from data values or executes text (AST audit of the sources).

Loopback-only servers and secrets: ``test_security.py``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("embed_factory", "flows", "tasks", "storage", "personas", "prompts", "bench")


# --------------------------------------------------------------------------- hostile generated text
INJECTIONS = [
    "'); DROP TABLE x; --",
    "Robert'); DROP TABLE raw; --",
    '"; DROP VIEW raw; SELECT "',
    "x' OR '1'='1",
    "$1 ? $run_id :name {runs} {clean} %s",
    "'; COPY (SELECT 1) TO '/tmp/pwned.csv'; --",
]
XSS_PERSONA = "<script>alert('persona')</script> a pen tester"
XSS_OUTPUT = "<img src=x onerror=alert('output')><script>document.write(1)</script>"


def hostile_run(data_dir: Path, run_id: str = "hostile") -> list[dict]:
    """A run whose personas, instructions and model output carry SQL and HTML (via the real storage layer)."""
    import pyarrow as pa

    from storage.schemas import INSTRUCTION_SCHEMA
    from storage.shards import RunStore, reject_row

    store = RunStore(data_dir, run_id)
    now = datetime.now(UTC)
    rows = []
    for i, text in enumerate(INJECTIONS + [XSS_OUTPUT]):
        rows.append(
            {
                "example_id": f"{run_id}:r00-retrieval-{i:06d}",
                "run_id": run_id,
                "shard_id": "g00-00000",
                "task_type": "retrieval",
                "instruction": f"Find documents about {text}",
                "instruction_id": f"i{i}",
                "persona_id": "p-xss",
                "persona": XSS_PERSONA,
                "placeholders": "{}",
                "prompt_version": "v1",
                "model": "<b>model</b>",
                "sampling": "{}",
                "attempts": 1,
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "latency_s": 0.5,
                "finish_reason": "stop",
                "query": f"{text} query {i}",
                "positive": f"A long enough positive document number {i} that mentions {text} in passing.",
                "negative": f"A different negative document {i}: {text}.",
                "parsed": json.dumps({"q": text}),
                "raw_text": XSS_OUTPUT + text,
                "created_at": now,
            }
        )
    rejects = [
        reject_row(
            example_id=f"{run_id}:r00-retrieval-999999",
            run_id=run_id,
            shard_id="g00-00000",
            stage="generate",
            task_type="retrieval",
            instruction=INJECTIONS[0],
            persona_id="p-xss",
            prompt_version="v1",
            model="m",
            attempts=3,
            reason=f"invalid output: {INJECTIONS[1]}",
            finish_reason="length",
            raw_text=XSS_OUTPUT,
            created_at=now,
        )
    ]
    store.write_shard("examples", "g00-00000", rows, rejects)
    store.write_instructions(
        pa.Table.from_pylist(
            [
                {
                    "instruction_id": f"i{i}",
                    "task_type": "retrieval",
                    "instruction": f"Find documents about {t}",
                    "normalized": f"find documents about {t}".lower(),
                    "persona_id": "p-xss",
                    "persona": XSS_PERSONA,
                }
                for i, t in enumerate(INJECTIONS + [XSS_OUTPUT])
            ],
            schema=INSTRUCTION_SCHEMA,
        )
    )
    return rows


def test_sql_injection_text_round_trips_harmlessly(tmp_path):
    from storage.catalog import Catalog
    from storage.shards import RunStore
    from tasks.cleaning.dedup import exact_dedup

    # the data dir's own path carries a quote and a statement too (paths are the only values pasted into DDL)
    data = tmp_path / "it's'; DROP TABLE raw; --" / "data"
    rows = hostile_run(data)
    catalog = Catalog(data)
    views = catalog.refresh()
    assert views["raw"] and views["rejects"] and views["instructions"]

    stored = catalog.query("SELECT example_id, query, positive, raw_text FROM raw ORDER BY example_id").to_pylist()
    assert [(r["query"], r["positive"], r["raw_text"]) for r in stored] == [
        (r["query"], r["positive"], r["raw_text"]) for r in sorted(rows, key=lambda r: r["example_id"])
    ]
    for text in INJECTIONS:  # bound as a parameter, the text matches itself and nothing else
        found = catalog.query("SELECT count(*) AS n FROM raw WHERE starts_with(query, ?)", [text]).to_pylist()
        assert found == [{"n": 1}], text
    assert catalog.query("SELECT reason FROM rejects").to_pylist() == [{"reason": f"invalid output: {INJECTIONS[1]}"}]

    # exact_dedup registers the Arrow table in DuckDB; the texts never enter the SQL
    result = exact_dedup(RunStore(data, "hostile").read_kind("examples"))
    assert result.kept.num_rows == len(rows)

    # the catalog and the x table an injection names are untouched; the CLI's query answers over the same data
    env = {**os.environ, "EMBED_FACTORY_STORAGE__DATA_DIR": str(data)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "embed_factory.cli",
            "query",
            "SELECT count(*) AS n, count(DISTINCT query) AS q FROM raw",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(rf"\b{len(rows)}\b.*\b{len(rows)}\b", out.stdout), out.stdout
    assert set(catalog.refresh()) >= {"raw", "rejects", "instructions"}
    assert not Path("/tmp/pwned.csv").exists()


def test_report_escapes_persona_and_model_text(tmp_path):
    from storage.catalog import Catalog
    from tasks.cleaning.report import write_report

    data = tmp_path / "data"
    hostile_run(data)
    catalog = Catalog(data)
    catalog.refresh()
    page = write_report(catalog, None, tmp_path / "report.html").read_text()
    assert "&lt;script&gt;alert(&#x27;persona&#x27;)&lt;/script&gt;" in page, "the persona is shown, escaped"
    assert "&lt;img src=x onerror=alert(&#x27;output&#x27;)&gt;" in page, "the model output is shown, escaped"
    assert "&lt;b&gt;model&lt;/b&gt;" in page
    # no tag from the data survives (the report has no <script> of its own; its <img> tags are data: PNGs)
    assert "<script" not in page.lower()
    assert "<img src=x" not in page and "<b>model</b>" not in page


# --------------------------------------------------------------------------- static audit
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|CREATE|COPY|DELETE|UPDATE|DROP|ATTACH|PRAGMA|SET|INSTALL|LOAD)\b")
#: values pasted into SQL text that are not data: quoting helpers, constants and identifiers from
#: fixed lists (report stages, catalog views), the user's own query (the `query` command) and COPY options
SAFE_CALLS = {"_literal", "_ident"}
SAFE_NAMES = {
    "_META_TABLE",  # a constant table name
    "path",  # catalog: _literal(<glob under the data dir>)
    "stage",
    "source",  # report: names from storage/stages.py / the catalog views, never from data
    "inner",
    "options",  # catalog.to_file: the user's own SQL (by design) and fixed COPY options
    "run_dir",  # cli: a duckdb command line printed as a hint, never executed
    "self.view_sql(view, has_files)",  # built from the above
    "'{runs}' if source == 'raw' else '{clean}'",  # report: filter placeholders, bound as parameters
}


def sql_interpolations() -> list[tuple[str, int, str]]:
    """(file, line, expression) for every value pasted into SQL-looking text in the project's code."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.JoinedStr):
                    text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                    if SQL_WORDS.search(text):
                        found += [
                            (str(path.relative_to(ROOT)), node.lineno, ast.unparse(v.value))
                            for v in node.values
                            if isinstance(v, ast.FormattedValue)
                        ]
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "format"
                    and "SQL" in ast.unparse(node.func.value)
                ):
                    found += [(str(path.relative_to(ROOT)), node.lineno, ast.unparse(k.value)) for k in node.keywords]
    return found


def _safe(expression: str) -> bool:
    call = re.match(r"(\w+)\(", expression)
    return expression in SAFE_NAMES or (call is not None and call.group(1) in SAFE_CALLS)


def test_no_sql_is_built_from_data_values():
    found = sql_interpolations()
    assert found, "the audit sees the SQL in the code (else it checks nothing)"
    # dedup's exact-duplicate SQL is formatted with a constant list of task types
    unsafe = [f for f in found if not _safe(f[2]) and not (f[0] == "tasks/cleaning/dedup.py" and f[2] == "doc_types")]
    assert not unsafe, (
        "values pasted into SQL text; bind them as parameters (? / $name) or quote an identifier "
        f"from a fixed list with _ident: {unsafe}"
    )
    print(f"[security] {len({(f[0], f[1]) for f in found})} SQL texts with {len(found)} interpolations audited")


def test_no_code_executes_text():
    calls = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = (
                    node.func.id
                    if isinstance(node.func, ast.Name)
                    else f"{ast.unparse(node.func.value)}.{node.func.attr}"
                    if isinstance(node.func, ast.Attribute)
                    else ""
                )
                shell = any(
                    k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords
                )
                if name in ("eval", "exec", "compile", "os.system", "os.popen", "pickle.loads") or shell:
                    calls.append((str(path.relative_to(ROOT)), node.lineno, name))
    assert not calls, f"code that executes text: {calls}"
