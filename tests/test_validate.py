"""Metrics by hand: cosine, agreement, accuracy, output kinds and the headline choice."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.errors import UsageError
from onnxprune.validate import (
    Headline,
    accuracy,
    choose_headline,
    mean_cosine,
    output_error,
    output_kind,
    top1_agreement,
)


def test_cosine_agreement_accuracy_by_hand():
    ref = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    cand = np.array([[1.0, 1.0], [0.0, 5.0], [4.0, 3.0]])
    # per-sample cosines: 1/sqrt(2), 1, 24/25
    assert mean_cosine(ref, cand) == pytest.approx((2**-0.5 + 1 + 0.96) / 3)
    assert top1_agreement(ref, cand) == pytest.approx(2 / 3)  # argmax 0,1,1 vs 0(tie->0),1,0
    assert accuracy(cand, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    err = output_error("y", ref, cand)
    assert (err.max_abs_error, err.mean_abs_error) == (3.0, pytest.approx((0 + 1 + 0 + 3 + 1 + 1) / 6))
    assert mean_cosine(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0
    assert mean_cosine(np.zeros((1, 3)), np.ones((1, 3))) == 0.0


def test_output_kinds():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    emb = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert output_kind(logits) == "logits"
    assert output_kind(probs) == "probabilities"
    assert output_kind(emb) == "embedding"
    assert output_kind(np.eye(3)) == "probabilities"  # confident one-hot rows are probabilities
    assert output_kind(np.zeros((4, 3, 2))) == "other"
    assert output_kind(np.zeros((4, 3), np.int64)) == "other"


def test_headline_choice():
    logits = np.array([[2.0, -1.0], [0.1, 0.2]])
    emb = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    labels = np.array([0, 1])
    assert choose_headline([logits], labels) == Headline("accuracy", 0)
    assert choose_headline([logits], None) == Headline("top1_agreement", 0)
    assert choose_headline([emb], labels) == Headline("cosine", 0)
    assert choose_headline([emb, logits], None) == Headline("top1_agreement", 1)
    assert choose_headline([logits], labels, "cosine") == Headline("cosine", 0)
    with pytest.raises(UsageError, match="needs a classifier output and integer class labels"):
        choose_headline([logits], None, "accuracy")
    with pytest.raises(UsageError, match="needs a classifier output"):
        choose_headline([emb], None, "agreement")
    # labels out of range for the classes are not class labels
    assert choose_headline([logits], np.array([0, 7])) == Headline("top1_agreement", 0)
