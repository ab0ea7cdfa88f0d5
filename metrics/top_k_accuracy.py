"""Top-1 and top-5 accuracy from ranked class predictions (an `evaluate` metric that loads offline)."""

import datasets
import evaluate

_DESCRIPTION = """
Top-k accuracy: the share of examples whose label is among the k best-ranked classes. `predictions` holds, for each
example, class indices sorted from most to least likely (e.g. `logits.topk(5).indices`); `references` the labels.
Returns `accuracy` (top-1) and `top5_accuracy`, fractions in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): ranked class indices per example (at least one).
    references (`list[int]`): the true class index per example.
Returns:
    accuracy (`float`): top-1 accuracy. top5_accuracy (`float`): top-5 accuracy.
Example:
    >>> metric = evaluate.load("metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0])
    {'accuracy': 0.5, 'top5_accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[list[int]], references: list[int]) -> dict[str, float]:
        if not references:
            raise ValueError("top_k_accuracy needs at least one example")
        top1 = sum(ranked[0] == label for ranked, label in zip(predictions, references))
        top5 = sum(label in ranked[:5] for ranked, label in zip(predictions, references))
        return {"accuracy": top1 / len(references), "top5_accuracy": top5 / len(references)}
