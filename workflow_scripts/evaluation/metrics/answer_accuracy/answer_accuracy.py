"""Verifiable-answer accuracy as an `evaluate` module (logic in workflow_scripts.evaluation.answers)."""

import datasets
import evaluate

import workflow_scripts


class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=(
                "Share of predictions whose final answer matches the reference: numbers within a relative "
                "tolerance (percent/fraction equivalent), otherwise normalised exact match."
            ),
            citation="snaketune",
            inputs_description="predictions: list of str; references: list of str; rel_tol: float",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rel_tol=0.01):
        from workflow_scripts.evaluation.answers import extract_answer, follows_format, is_correct

        correct = [is_correct(p, r, rel_tol) for p, r in zip(predictions, references, strict=False)]
        fmt = [follows_format(p) for p in predictions]
        n = max(len(correct), 1)
        return {
            "answer_accuracy": sum(correct) / n,
            "format_following": sum(fmt) / n,
            "per_example": {
                "correct": correct,
                "follows_format": fmt,
                "extracted": [extract_answer(p) for p in predictions],
            },
            "rel_tol": rel_tol,
            "package": workflow_scripts.__name__,
        }
