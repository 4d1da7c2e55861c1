"""Benchmark validation: today's implementation (``git show <rev>:tasks/cleaning/validate.py``, loaded as a
temporary module) against the working tree's, side by side on the same shards, alternating trials.

Shards are synthetic but shaped like generator output: six task types, eight languages (word salad from
each language's common words, which py3langid identifies like prose), query/document lengths like the
KaLM-style prompts ask for, and about 15 % planted defects covering every drop reason (empty fields, bad
lengths, loops, copies, instruction leaks, wrong languages). Real shards are used instead when
``--shards`` points at parquet files (e.g. ``data/runs/<run>/examples/*.parquet``).

Rows/s is rows over wall time of ``validate_examples`` (one process, one core); the median and the range
over the trials are printed for each side, then the speed-up. Both sides must keep the same ids and drop
the same ids with the same reasons and details, or the bench fails.

    python bench/validate.py --rows 20000 --trials 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tasks/cleaning/validate.py"
sys.path.insert(0, str(ROOT))

from ground.settings import CleanSettings  # noqa: E402
from storage.corpus import Drops, dropped_table  # noqa: E402
from storage.schemas import EXAMPLE_SCHEMA  # noqa: E402
from tasks.cleaning import dedup  # noqa: E402
from tasks.cleaning.validate import python_text_classes, validate_examples  # noqa: E402

# --- synthetic shards -------------------------------------------------------------------------
#: common words per prompt language; CJK ones are joined without spaces
VOCABULARY: dict[str, tuple[str, ...]] = {
    "English": tuple(
        "the house heat pump winter cold air water energy family garden kitchen window roof wall "
        "insulation cost price neighbour city village engineer summer morning evening system pipe "
        "floor door power bill month year repair service noise comfort temperature which because "
        "would should about their there people never always between without through".split()
    ),
    "French": tuple(
        "le la les une des maison chaleur pompe hiver froid air eau énergie famille jardin cuisine "
        "fenêtre toit mur isolation prix voisin ville village ingénieur été matin soir système tuyau "
        "porte facture mois année réparation bruit confort température parce que avec pour dans "
        "sans toujours jamais entre notre leur être avoir très".split()
    ),
    "German": tuple(
        "der die das ein eine Haus Wärme Pumpe Winter kalt Luft Wasser Energie Familie Garten "
        "Küche Fenster Dach Wand Dämmung Preis Nachbar Stadt Dorf Ingenieur Sommer Morgen Abend "
        "System Rohr Boden Tür Rechnung Monat Jahr Reparatur Lärm Temperatur weil mit für ohne "
        "immer nicht auch sehr zwischen unsere werden haben ist".split()
    ),
    "Spanish": tuple(
        "el la los las una casa calor bomba invierno frío aire agua energía familia jardín cocina "
        "ventana techo pared aislamiento precio vecino ciudad pueblo ingeniero verano mañana tarde "
        "sistema tubo suelo puerta factura mes año reparación ruido temperatura porque con para sin "
        "siempre nunca entre nuestro también muy está".split()
    ),
    "Russian": tuple(
        "дом тепло насос зима холодный воздух вода энергия семья сад кухня окно крыша стена "
        "изоляция цена сосед город деревня инженер лето утро вечер система труба пол дверь счёт "
        "месяц год ремонт шум температура потому что с для без всегда никогда между наш очень "
        "было будет этот".split()
    ),
    "Hindi": tuple(
        "घर गर्मी पंप सर्दी ठंडा हवा पानी ऊर्जा परिवार बगीचा रसोई खिड़की छत दीवार कीमत पड़ोसी शहर "
        "गांव इंजीनियर गर्मियों सुबह शाम प्रणाली पाइप दरवाजा बिल महीना साल मरम्मत शोर तापमान क्योंकि "
        "के लिए साथ बिना हमेशा कभी नहीं हमारा बहुत है था".split()
    ),
    "Chinese": tuple(
        "房子 热泵 冬天 寒冷 空气 水 能源 家庭 花园 厨房 窗户 屋顶 墙壁 保温 价格 邻居 城市 村庄 工程师 "
        "夏天 早上 晚上 系统 管道 地板 门 账单 每月 今年 维修 噪音 舒适 温度 因为 所以 我们 他们 "
        "非常 可以 已经 没有 这个 那个 的 了 是 在".split()
    ),
    "Japanese": tuple(
        "家 ヒートポンプ 冬 寒い 空気 水 エネルギー 家族 庭 台所 窓 屋根 壁 断熱 価格 近所 町 村 "
        "技術者 夏 朝 夜 システム 配管 床 ドア 請求書 毎月 今年 修理 騒音 快適 温度 ので から "
        "です ます は が を に で と の ません".split()
    ),
}
CJK = {"Chinese", "Japanese"}
TASK_TYPES = ("retrieval", "classification", "short_short", "long_long", "sts", "bitext")
INSTRUCTIONS = {
    "retrieval": "Given a home heating question, retrieve documents that answer it.",
    "classification": "Classify the sentiment of a product review.",
    "short_short": "Match a scientific term with its definition.",
    "long_long": "Given an essay about home heating, retrieve essays on the same topic.",
    "sts": "Retrieve semantically similar text.",
    "bitext": "Retrieve parallel sentences.",
}
LABELS = ("positive", "negative", "neutral", "mixed")


def salad(rng: np.random.Generator, language: str, n_chars: int) -> str:
    """Sentences of random common words of ``language``, about ``n_chars`` characters long."""
    words = VOCABULARY[language]
    joiner, end = ("", "。") if language in CJK else (" ", ".")
    sentences, size = [], 0
    while size < n_chars:
        sentence = joiner.join(words[i] for i in rng.integers(0, len(words), rng.integers(5, 14)))
        sentence = sentence[:1].upper() + sentence[1:] + end
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


def defect(rng: np.random.Generator, row: dict) -> None:
    """Plant one defect (drawn uniformly) in ``row``: every drop reason gets its share."""
    kind = rng.integers(0, 10)
    if kind == 0:
        row["query"] = rng.choice(["", "   ", None])
    elif kind == 1:
        row["negative"] = None if row["task_type"] in ("retrieval", "sts", "bitext", "classification") else ""
    elif kind == 2:
        row["positive"] = "ok"
    elif kind == 3:
        row["query"] = row["query"] * 60
    elif kind == 4:
        row["positive"] = rng.choice(
            ["I love you. " * 30, "a" * 60, "spam eggs spam spam spam ham spam " * 4, "?!?! ... --- !!!"]
        )
    elif kind == 5:
        row["positive"] = "  " + row["query"].upper() + "!! "
    elif kind == 6:
        row["negative"] = row["positive"].lower()
    elif kind == 7:
        row["query"] = row["instruction"].lower()
    elif kind == 8:
        row["positive"] = "Task: " + row["instruction"] + " " + row["positive"]
    else:
        other = "German" if json.loads(row["placeholders"]).get("language") != "German" else "French"
        row["positive"] = salad(rng, other, max(80, len(row["positive"] or "")))


def synthetic_shard(n: int, seed: int, defect_share: float = 0.15) -> pa.Table:
    """``n`` example rows (EXAMPLE_SCHEMA) of mixed task types and languages, some with a planted defect."""
    rng = np.random.default_rng(seed)
    languages = list(VOCABULARY)
    weights = np.array([0.5] + [0.5 / (len(languages) - 1)] * (len(languages) - 1))
    rows = []
    for i in range(n):
        task_type = TASK_TYPES[rng.integers(0, len(TASK_TYPES))]
        language = languages[rng.choice(len(languages), p=weights)]
        placeholders = {"language": language}
        if task_type == "bitext":
            target = languages[rng.integers(0, len(languages))]
            placeholders = {"src_lang": language, "tgt_lang": target, "unit": "sentence"}
            query, positive = salad(rng, language, 90), salad(rng, target, 90)
            negative = salad(rng, target, 90)
        elif task_type == "classification":
            query, positive, negative = salad(rng, language, 120), *rng.choice(LABELS, 2, replace=False)
        elif task_type == "long_long":
            query, positive, negative = salad(rng, language, 900), salad(rng, language, 900), None
        elif task_type == "short_short":
            query, positive, negative = salad(rng, language, 25), salad(rng, language, 90), None
        else:  # retrieval, sts
            query = salad(rng, language, int(rng.integers(40, 160)))
            positive = salad(rng, language, int(rng.integers(200, 1500)))
            negative = salad(rng, language, int(rng.integers(200, 1500)))
        row = {
            "example_id": f"bench:{seed:03d}-{i:07d}",
            "run_id": "bench",
            "shard_id": f"g00-{seed:05d}",
            "task_type": task_type,
            "instruction": INSTRUCTIONS[task_type],
            "placeholders": json.dumps(placeholders),
            "query": query,
            "positive": str(positive),
            "negative": None if negative is None else str(negative),
        }
        if rng.random() < defect_share:
            defect(rng, row)
        rows.append(row)
    columns = {name: pa.nulls(n, field.type) for name, field in zip(EXAMPLE_SCHEMA.names, EXAMPLE_SCHEMA, strict=True)}
    for name in rows[0] if rows else ():
        columns[name] = pa.array([r[name] for r in rows], EXAMPLE_SCHEMA.field(name).type)
    return pa.table(columns, schema=EXAMPLE_SCHEMA)


# --- the implementation before polars -----------------------------------------------------------
def revision_before_polars() -> str:
    """The newest commit whose validate.py does not use polars (the comparison's baseline)."""
    commits = subprocess.run(
        ["git", "log", "--format=%H", "--", MODULE], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for commit in commits:
        if "import polars" not in git_show(commit):
            return commit
    raise SystemExit(f"no revision of {MODULE} without polars")


def git_show(rev: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def load_revision(rev: str, folder: Path):
    """validate.py as of ``rev``, imported as a module of its own (it imports today's dedup helpers)."""
    source = git_show(rev)
    if not hasattr(dedup, "normalize_array"):  # renamed since; same function
        source = source.replace(
            "from tasks.cleaning.dedup import dropped_table, normalize_array",
            "from tasks.cleaning.dedup import dedup_keys as normalize_array, dropped_table",
        )
    if not hasattr(dedup, "dropped_table"):  # moved to storage.corpus since, with its rows as a Drops
        dedup.dropped_table = lambda table, rows, stage, reasons, details: dropped_table(
            table, stage, Drops(rows, reasons, details)
        )
    path = folder / f"validate_{rev[:12]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- measuring --------------------------------------------------------------------------------
def verdicts(results) -> tuple[list, list]:
    """(kept ids, dropped (id, reason, detail)) over all shards."""
    kept, dropped = [], []
    for result in results:
        kept += result.kept.column("example_id").to_pylist()
        d = result.dropped
        dropped += list(zip(*(d.column(c).to_pylist() for c in ("example_id", "reason", "detail")), strict=True))
    return kept, dropped


def timed(validate, shards: list[pa.Table], cfg: CleanSettings):
    wall, cpu = time.perf_counter(), time.process_time()
    results = [validate(shard, cfg) for shard in shards]
    return results, time.perf_counter() - wall, time.process_time() - cpu


def summary(name: str, rows: int, walls: list[float], cpus: list[float]) -> float:
    per_s = sorted(rows / w for w in walls)
    per_cpu_s = sorted(rows / c for c in cpus)
    print(
        f"  {name:<8} {statistics.median(per_s):8.0f} rows/s  (range {per_s[0]:.0f}-{per_s[-1]:.0f})   "
        f"{statistics.median(per_cpu_s):8.0f} rows/CPU-s  (range {per_cpu_s[0]:.0f}-{per_cpu_s[-1]:.0f})"
    )
    return statistics.median(per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="synthetic rows in all (default 20000)")
    parser.add_argument("--shard-rows", type=int, default=5000, help="rows per synthetic shard")
    parser.add_argument("--shards", nargs="*", help="real example shards (parquet) instead of synthetic ones")
    parser.add_argument("--trials", type=int, default=3, help="alternating trials per side (>= 3)")
    parser.add_argument("--rev", help="baseline revision (default: newest validate.py without polars)")
    parser.add_argument(
        "--no-language",
        action="store_true",
        help="check_language off: time only the checks polars screens (py3langid is the same code)",
    )
    args = parser.parse_args()

    if args.shards:
        shards = [pq.read_table(path) for path in args.shards]
        source = f"{len(shards)} real shards"
    else:
        sizes = [args.shard_rows] * (args.rows // args.shard_rows) + [args.rows % args.shard_rows] * bool(
            args.rows % args.shard_rows
        )
        shards = [synthetic_shard(size, seed) for seed, size in enumerate(sizes)]
        source = f"{len(shards)} synthetic shards"
    rows = sum(s.num_rows for s in shards)
    cfg = CleanSettings().model_copy(update={"check_language": not args.no_language})
    rev = args.rev or revision_before_polars()
    with tempfile.TemporaryDirectory() as folder:
        before = load_revision(rev, Path(folder))
    print(
        f"validation: {rows} rows in {source}; before = {MODULE} at {rev[:12]}, after = working tree; "
        f"check_language={cfg.check_language}"
    )

    # one-off costs, outside the trials: py3langid's model (each side loads its own), Python's text tables
    start = time.perf_counter()
    python_text_classes()
    print(f"  one-off: Python text tables for polars {time.perf_counter() - start:.2f} s per process")
    before.language_identifier()
    validate_examples(shards[0].slice(0, 50), cfg)

    sides = {"before": before.validate_examples, "after": validate_examples}
    walls = {name: [] for name in sides}
    cpus = {name: [] for name in sides}
    reference = None
    for trial in range(max(3, args.trials)):
        for name in ("before", "after") if trial % 2 == 0 else ("after", "before"):
            results, wall, cpu = timed(sides[name], shards, cfg)
            walls[name].append(wall)
            cpus[name].append(cpu)
            got = verdicts(results)
            reference = reference or got
            assert got == reference, f"{name} (trial {trial + 1}) differs from the first run's verdicts"
            print(f"  trial {trial + 1} {name:<6} {wall:7.2f} s wall  {cpu:7.2f} s CPU", flush=True)

    kept, dropped = reference
    reasons = Counter(reason for _, reason, _ in dropped)
    print(
        f"  identical verdicts on both sides: {len(kept)} kept, {len(dropped)} dropped "
        f"({', '.join(f'{r} {c}' for r, c in reasons.most_common())})"
    )
    median_before = summary("before", rows, walls["before"], cpus["before"])
    median_after = summary("after", rows, walls["after"], cpus["after"])
    print(f"  speed-up (median rows/s): {median_after / median_before:.2f}x")


if __name__ == "__main__":
    main()
