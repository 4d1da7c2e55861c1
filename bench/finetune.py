"""Benchmark the fine-tune: training samples/s at batch 32 and the STS-B English delta it buys.

A short real training run (``--steps``, default 15 optimizer steps at ``--batch-size`` 32, the KaLM
recipe of ``tasks/training/train.py``: Matryoshka InfoNCE with in-batch and hard negatives,
semi-homogeneous task batches) on the latest clean export (or ``--clean-id``), from the bundled
all-MiniLM-L6-v2 (or ``--base-model DIR``). The model is evaluated before and after on the whole
English STS Benchmark test split (1,379 pairs; ``--sts-max-pairs`` for fewer) and, if the export
has one, on its held-out split (nDCG@10). Samples/s is ``tasks.training.train``'s: training rows through the
loss per second of the training loop (model loading, data preparation and saving excluded).

On a CUDA machine ``tasks.training.train`` trains in bf16 with gradient checkpointing by itself; see
``bench/finetune_gpu.sh``. The delta (after - before) is printed last. Results also go to
``bench/results/finetune-<time>.json``.

    python bench/finetune.py                       # CPU, 15 steps, latest export
    python bench/finetune.py --steps 20 --clean-id c1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.finetune import FinetuneError, check_base_model, resolve_export  # noqa: E402
from ground.settings import load_settings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clean-id", help="clean run whose export to train on (default: the latest with an export)")
    parser.add_argument("--base-model", help="model folder to start from (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps (default 15)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: finetune.max_seq_length (256)")
    parser.add_argument("--sts-max-pairs", type=int, default=None, help="STS-B en test pairs (default: all 1379)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: storage.data_dir")
    parser.add_argument("--keep", type=Path, default=None, help="keep the trained model in this folder")
    parser.add_argument("--no-heldout", action="store_true", help="skip the held-out retrieval evaluation")
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="fail unless training ran on a CUDA GPU in bf16 (bench/finetune_gpu.sh)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")
    return args


def fmt_dims(values: dict, signed: bool = False) -> str:
    return "  ".join(f"{dim}: {v:+.4f}" if signed else f"{dim}: {v:.4f}" for dim, v in values.items() if v is not None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from tasks.training.evaluate import delta, evaluate_model
    from tasks.training.train import train_embedding_model

    settings = load_settings()
    data_dir = args.data_dir or settings.storage.data_dir
    try:
        clean_id, train_path, heldout_path = resolve_export(data_dir, args.clean_id)
        check_base_model(args.base_model)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.no_heldout:
        heldout_path = None
    updates = {
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "sts_languages": ["en"],
        "sts_max_pairs": args.sts_max_pairs,
    }
    if args.base_model:
        updates["base_model"] = args.base_model
    if args.max_seq_length:
        updates["max_seq_length"] = args.max_seq_length
    cfg = settings.finetune.model_copy(update=updates)

    import pyarrow.parquet as pq

    rows = pq.read_metadata(train_path).num_rows
    device = (
        f"cuda ({torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    )
    print(f"export: {train_path} ({rows} rows), clean run {clean_id}")
    print(
        f"model: {cfg.base_model or 'all-MiniLM-L6-v2 (bundled)'}; device: {device}; torch {torch.__version__}; "
        f"{platform.python_version()}"
    )
    print(
        f"training: {args.steps} steps x batch {args.batch_size}, max_seq_length {cfg.max_seq_length}, "
        f"hard negatives {cfg.hard_negatives}, lr {cfg.learning_rate:g}"
    )

    if args.require_cuda and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 1
    on_gpu = torch.cuda.is_available()

    def evaluate(path):
        """On a GPU: the model on the GPU, fp32 (fast, both sides alike); on the CPU: tasks.training.evaluate's
        default."""
        if not on_gpu:
            return evaluate_model(path, cfg, heldout_path)
        from tasks.training.evaluate import load_model

        model = load_model(path, cfg.max_seq_length).to("cuda")
        try:
            return evaluate_model(model, cfg, heldout_path, bf16=False)
        finally:
            del model
            torch.cuda.empty_cache()

    started = time.perf_counter()
    before = evaluate(cfg.base_model)
    print(
        f"before: STS-B en Spearman ({before.sts.pairs['en']} pairs, {before.precision}, "
        f"{before.seconds:.1f}s)  {fmt_dims(before.sts.spearman['en'])}"
    )

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        out_dir = args.keep or Path(tmp) / "model"
        result = train_embedding_model(train_path, out_dir, cfg)
        print(
            f"trained: {result.steps} steps, {result.samples} samples in {result.train_seconds:.1f}s "
            f"({result.epochs:.2f} epochs, {result.device}, {result.precision}"
            f"{', gradient checkpointing' if result.gradient_checkpointing else ''}); loss "
            f"{result.loss_start:.4f} -> {result.loss_end:.4f} (mean of the first and last {result.loss_window} "
            "steps)"
        )
        after = evaluate(str(result.model_dir))
    print(
        f"after:  STS-B en Spearman ({after.sts.pairs['en']} pairs, {after.precision}, "
        f"{after.seconds:.1f}s)  {fmt_dims(after.sts.spearman['en'])}"
    )
    change = delta(before, after)
    if args.require_cuda and (result.device != "cuda" or result.precision != "bf16"):
        print(f"error: training ran on {result.device} in {result.precision}, not cuda/bf16", file=sys.stderr)
        return 1
    total = time.perf_counter() - started

    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "clean_id": clean_id,
        "train_rows": rows,
        "device": device,
        "torch": torch.__version__,
        "steps": result.steps,
        "batch_size": args.batch_size,
        "samples": result.samples,
        "rows_per_step": result.samples / result.steps if result.steps else None,
        "train_seconds": result.train_seconds,
        "samples_per_s": result.samples_per_s,
        "precision": result.precision,
        "losses": result.losses,
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "loss_window": result.loss_window,
        "before": before.model_dump(mode="json"),
        "after": after.model_dump(mode="json"),
        "delta": change.model_dump(mode="json"),
        "total_seconds": total,
    }
    out = Path(__file__).resolve().parent / "results" / f"finetune-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"results: {out}  (total {total:.0f}s)")
    if change.retrieval:
        print(
            "held-out nDCG@10 delta: "
            + fmt_dims({d: m.get("ndcg@10") for d, m in change.retrieval.items()}, signed=True)
        )
    per_step = result.samples / result.steps if result.steps else 0.0
    print(
        f"training samples/s: {result.samples_per_s:.2f} (batch {args.batch_size}, {per_step:.1f} rows per step on "
        f"average, {result.device}, {result.precision})"
    )
    if on_gpu:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"STS-B en delta (after - before, {after.sts.pairs['en']} pairs): {fmt_dims(change.sts['en'], signed=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
