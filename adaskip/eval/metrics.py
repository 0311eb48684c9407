"""Scores: exact match (retrieval), ROUGE-L (summary fidelity), perplexity (language modelling). The KL divergence
lives with the selection that also optimizes it (adaskip.calibrate.compensation.kl_divergence)."""

from __future__ import annotations

import math
import re
import string
from functools import lru_cache

import torch

_ANSWER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def normalize(text: str) -> str:
    """Lower case, punctuation and quotes dropped, whitespace collapsed (SQuAD-style answer normalization)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation.replace("-", "")))
    return " ".join(text.split())


def extract_answer(generated: str) -> str:
    """The answer a short-answer prompt produced: its first word (after quotes, colons, spaces)."""
    m = _ANSWER.search(generated)
    return m.group(0) if m else ""


def exact_match(generated: str, answer: str) -> float:
    """1.0 when the generated answer is exactly the expected one (after normalization), else 0.0."""
    return float(bool(answer) and normalize(extract_answer(generated)) == normalize(answer))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of `prediction` against `reference` (1.0 for two empty texts: they agree)."""
    if not prediction.strip() and not reference.strip():
        return 1.0
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token: logits [N, V], targets [N] -> [N]."""
    return -torch.log_softmax(logits.double(), -1).gather(-1, targets.long()[:, None]).squeeze(-1)


def perplexity(nll: list[float] | torch.Tensor) -> float:
    """exp(mean negative log-likelihood)."""
    values = torch.as_tensor(nll, dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("perplexity of no tokens")
    return float(torch.exp(values.mean()))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
