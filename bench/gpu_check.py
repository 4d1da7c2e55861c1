"""The prepared GPU check: exact top-100 search at KaLM scale and decoder training throughput, as one JSON.

Run on a GPU machine (no network needed; sized to fit a 10-minute command, not yet timed on a GPU)::

    python3 bench/gpu_check.py --out gpu_check.json

1. **Exact search** (tasks/cleaning/search/torch_device.py, the clean step's path on a GPU worker without
   faiss-gpu): 550k queries × 1.1M corpus × 384-d unit vectors, top 100 each, fp32 on the GPU; prints the
   time and checks a sample of queries against a float64 brute force on the CPU (same top-100 ids but for
   near-ties below 1e-5, scores within 1e-5).
2. **Split search** (tasks/cleaning/search/split.py): the same search of ``--split-queries`` queries as one
   query block and as two blocks one after the other on the same device (the path's split overhead: a second
   index build, shorter batches), alternated twice; prints both times, their ratio and whether the two agree
   exactly (same ids, same scores).
3. **Decoder training** at Qwen2-0.5B's shape (24 layers, 896 wide, GQA 14/2 heads, vocabulary 151,936),
   randomly initialised (no download), mean pooling, sequence length 512, bf16 autocast, gradient
   checkpointing, the project's loss (MatryoshkaLoss over MultipleNegativesRankingLoss, scale 100, dims
   896/512/256/128/64) with 1 positive + 7 hard negatives per query; prints samples/s (one sample = query,
   positive and 7 negatives) after warm-up steps.

It needs only torch, numpy, transformers, tokenizers and sentence-transformers (what a GPU image has);
``--device cpu --tiny`` runs the same code at toy sizes, which is how the test suite keeps it working.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ground.settings import CleanSettings  # noqa: E402
from tasks.cleaning.search import search_split  # noqa: E402
from tasks.cleaning.search.torch_device import TorchExactIndex  # noqa: E402
from tasks.training.losses import matryoshka_dims_for  # noqa: E402

QWEN2_0_5B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151_936,
    max_position_embeddings=4096,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=512,
)


def unit_vectors(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """Clustered unit vectors (200 centres), generated on the device in float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn((200, dim), generator=g, device=device)
    pick = torch.randint(0, 200, (n,), generator=g, device=device)
    x = centres[pick] + 0.9 * torch.randn((n, dim), generator=g, device=device)
    return torch.nn.functional.normalize(x, dim=1)


def check_search(args, device: torch.device) -> dict:
    corpus = unit_vectors(args.corpus, args.dim, 0, device).cpu().numpy()
    queries = unit_vectors(args.queries, args.dim, 1, device).cpu().numpy()
    index = TorchExactIndex(corpus, str(device))
    index.search(queries[:256], args.k)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    scores, ids = index.search(queries, args.k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    rng = np.random.default_rng(0)
    sample = rng.choice(len(queries), size=min(args.sample, len(queries)), replace=False)
    exact = queries[sample].astype(np.float64) @ corpus.astype(np.float64).T
    mismatched_rows, worst_score_error = 0, 0.0
    for row, q in enumerate(sample):
        ref_ids = np.argsort(-exact[row], kind="stable")[: args.k]
        worst_score_error = max(worst_score_error, float(np.abs(exact[row, ids[q]] - scores[q]).max()))
        if set(ref_ids) != set(ids[q]):
            # allowed only for items tied with the k-th score to fp32 rounding
            boundary = exact[row, ref_ids[-1]]
            differing = set(ref_ids) ^ set(ids[q])
            if any(abs(exact[row, i] - boundary) > 1e-5 for i in differing):
                mismatched_rows += 1
    flops = 2.0 * args.queries * args.corpus * args.dim
    return {
        "queries": args.queries,
        "corpus": args.corpus,
        "dim": args.dim,
        "k": args.k,
        "seconds": round(seconds, 3),
        "tflops": round(flops / seconds / 1e12, 2),
        "sample": len(sample),
        "mismatched_rows": mismatched_rows,
        "max_score_error": worst_score_error,
        "equal_to_exact": mismatched_rows == 0 and worst_score_error < 1e-5,
    }


def check_split(args, device: torch.device) -> dict:
    """One device: the split search as 1 block and as 2 blocks, alternated (1, 2, 1, 2); the best of each."""
    corpus = unit_vectors(args.split_corpus or args.corpus, args.dim, 0, device).cpu().numpy()
    queries = unit_vectors(args.split_queries, args.dim, 2, device).cpu().numpy()
    cfg = CleanSettings(search_device="cpu" if device.type == "cpu" else "cuda")
    k = args.split_k or args.k
    search_split(corpus, queries[:256], k, cfg, blocks=1, backend="torch")  # warm-up: kernels, allocator
    seconds: dict[int, list[float]] = {1: [], 2: []}
    results = {}
    for blocks in (1, 2, 1, 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        results[blocks] = search_split(corpus, queries, k, cfg, blocks=blocks, backend="torch")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[blocks].append(time.perf_counter() - started)
    one, two = min(seconds[1]), min(seconds[2])
    return {
        "queries": args.split_queries,
        "corpus": len(corpus),
        "dim": args.dim,
        "k": k,
        "devices_visible": torch.cuda.device_count() if device.type == "cuda" else 0,
        "seconds_1_block": round(one, 3),
        "seconds_2_blocks": round(two, 3),
        "ratio_2_to_1": round(two / one, 3),
        "equal": bool(np.array_equal(results[1][1], results[2][1]) and np.array_equal(results[1][0], results[2][0])),
    }


def random_decoder(folder: Path, shape: dict, seq: int):
    """A randomly initialised Qwen2 at ``shape`` with a word-level tokenizer, as a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(min(shape["vocab_size"], 30_000) - 2)}}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(**shape, pad_token_id=0)).save_pretrained(folder)
    transformer = models.Transformer(str(folder), max_seq_length=seq)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling])


def check_training(args, device: torch.device) -> dict:
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    shape = TINY if args.tiny else QWEN2_0_5B
    with tempfile.TemporaryDirectory() as tmp:
        model = random_decoder(Path(tmp), shape, args.seq).to(device)
    model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    dims, weights = matryoshka_dims_for(shape["hidden_size"], [896, 512, 256, 128, 64], [1.0, 0.3, 0.2, 0.1, 0.1])
    loss_fn = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=100.0), dims, weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = min(shape["vocab_size"], 30_000)
    g = torch.Generator().manual_seed(0)

    def batch_features() -> dict:
        """Token ids of full-length random "texts" (what the tokenizer would hand the model)."""
        ids = torch.randint(2, vocab, (args.batch, args.seq), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    columns = 2 + args.negatives  # query, positive, hard negatives
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        features = [batch_features() for _ in range(columns)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(features, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            losses.append(loss.item())
    per_step = float(np.median(times))
    return {
        "shape": "tiny" if args.tiny else "Qwen2-0.5B",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "seq": args.seq,
        "batch": args.batch,
        "negatives": args.negatives,
        "bf16": bf16,
        "gradient_checkpointing": True,
        "steps_timed": len(times),
        "seconds_per_step": round(per_step, 3),
        "samples_per_s": round(args.batch / per_step, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a functional check)")
    parser.add_argument(
        "--tiny", action="store_true", help="toy sizes: 2k x 4k search, 9k x 1k top-10 split, a 2-layer decoder"
    )
    parser.add_argument("--queries", type=int, default=550_000)
    parser.add_argument("--corpus", type=int, default=1_100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--split-queries", type=int, default=200_000, help="queries of the split-search timing")
    parser.add_argument("--split-corpus", type=int, help="corpus of the split-search timing (default: --corpus)")
    parser.add_argument("--split-k", type=int, help="results per query of the split-search timing (default: --k)")
    parser.add_argument("--sample", type=int, default=200, help="queries checked against a float64 brute force")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the results JSON here too")
    args = parser.parse_args(argv)
    if args.tiny:
        args.queries, args.corpus, args.sample, args.seq, args.batch = 2000, 4000, 50, 32, 4
        # two blocks: 8192 + 808 (blocks start on the search's batches)
        args.split_queries, args.split_corpus, args.split_k = 9000, 1000, 10
        args.negatives, args.warmup, args.steps = 2, 1, 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible to torch (use --device cpu --tiny for a functional check)")
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    results["search"] = check_search(args, device)
    print(json.dumps({"search": results["search"]}), flush=True)
    results["split"] = check_split(args, device)
    print(json.dumps({"split": results["split"]}), flush=True)
    results["training"] = check_training(args, device)
    print(json.dumps({"training": results["training"]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
