"""`kind: classification` tasks: a trained classifier (a `task: classification` run folder) labels each item.

Per item: the predicted label and `acc` (1 right, 0 wrong), so the report's bootstrap CIs and McNemar's test
apply as for multiple choice. Per model: macro F1, F1 per label and the confusion matrix (scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sklearn.metrics import confusion_matrix, f1_score

from llmtune.data.loading import DataError
from llmtune.eval.items import ClassificationItem
from llmtune.inference.classifier import Classifier


def score_classification(classifier: Classifier, items: list[ClassificationItem], path: Path, batch_size: int,
                         advance: Callable[[int], None] = lambda n: None) -> Iterator[dict[str, Any]]:
    unknown = sorted({item.label for item in items} - set(classifier.labels))
    if unknown:
        raise DataError(f"{path}: labels {', '.join(map(repr, unknown))} are not among the model's labels "
                        f"({', '.join(classifier.labels)})")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        probabilities = classifier.logits([item.text for item in chunk], batch_size).softmax(-1)
        for item, row in zip(chunk, probabilities.tolist(), strict=True):
            predicted = classifier.labels[max(range(len(row)), key=row.__getitem__)]
            yield {"id": item.id, "category": item.category, "label": item.label, "predicted": predicted,
                   "acc": float(predicted == item.label),
                   "probs": {label: round(p, 6) for label, p in zip(classifier.labels, row, strict=True)}}
        advance(len(chunk))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Macro F1, F1 per label and the confusion matrix (rows: true label, columns: predicted), over the labels
    that occur as a true or predicted label, in alphabetical order."""
    gold, predicted = [r["label"] for r in rows], [r["predicted"] for r in rows]
    labels = sorted(set(gold) | set(predicted))
    per_label = f1_score(gold, predicted, labels=labels, average=None, zero_division=0)
    return {
        "labels": labels,
        "f1_macro": float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)),
        "f1_per_label": {label: float(f1) for label, f1 in zip(labels, per_label, strict=True)},
        "confusion_matrix": confusion_matrix(gold, predicted, labels=labels).tolist(),
    }
