"""The evaluation texts that decontamination checks generated rows against, gathered from settings.

The STS Benchmark test splits that fine-tuning evaluates on (``finetune.sts_dir`` or the bundled
copy; ``clean.decontaminate_sts_languages``, default every language of ``finetune.sts_languages``),
then ``clean.decontaminate_files`` and ``clean.decontaminate_hub``. Each text keeps its source (e.g.
``stsb-en-test``, a file name, ``hub:owner/name/file``) and row, for the drop detail.
"""

from __future__ import annotations

from ground.settings import Settings
from storage.eval_files import hub_dataset_files, read_eval_file
from tasks.cleaning.decontaminate import EvalText
from tasks.training.eval_data import load_sts, sts_dir_for


def gather_eval_texts(settings: Settings) -> list[EvalText]:
    cfg = settings.clean
    texts: list[EvalText] = []
    sts_dir = sts_dir_for(settings.finetune)
    for lang in cfg.decontaminate_sts_languages or settings.finetune.sts_languages:
        s1, s2, _ = load_sts(sts_dir, lang)  # the whole split: sts_max_pairs samples only the scoring
        source = f"stsb-{lang}-test"
        texts += [EvalText(source, row, text) for row, pair in enumerate(zip(s1, s2, strict=True)) for text in pair]
    for path in cfg.decontaminate_files:
        texts += [EvalText(path.name, row, text) for row, text in read_eval_file(path, cfg.decontaminate_columns)]
    for repo_id in cfg.decontaminate_hub:
        for path in hub_dataset_files(repo_id):
            rows = read_eval_file(path, cfg.decontaminate_columns)
            texts += [EvalText(f"hub:{repo_id}/{path.name}", row, text) for row, text in rows]
    return texts
