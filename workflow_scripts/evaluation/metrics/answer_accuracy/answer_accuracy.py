"""Verifiable-answer accuracy as an `evaluate` module (logic in workflow_scripts.evaluation.answers)."""

import datasets
import evaluate

import workflow_scripts


class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=(
                "Share of predictions whose final answer matches the reference: numbers rounded to the "
                "decimals the reference shows (mode 'precision') or within a relative tolerance (mode "
                "'relative'), percent/fraction equivalent; yes/no by the leading yes/no; otherwise "
                "normalised exact match. Per example: the parsed answer and the rule that decided."
            ),
            citation="snaketune",
            inputs_description=(
                "predictions: list of str; references: list of str; mode: 'precision' or 'relative'; "
                "rel_tol: float (relative mode)"
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, mode, rel_tol):
        # mode and rel_tol have no defaults here: the stage passes evaluation.answer_match and
        # evaluation.answer_tolerance (their defaults live in the schema).
        from workflow_scripts.evaluation.answers import extract_answer, follows_format, judge

        verdicts = [judge(p, r, mode, rel_tol) for p, r in zip(predictions, references, strict=False)]
        correct = [v.correct for v in verdicts]
        fmt = [follows_format(p) for p in predictions]
        n = max(len(correct), 1)
        return {
            "answer_accuracy": sum(correct) / n,
            "format_following": sum(fmt) / n,
            "per_example": {
                "correct": correct,
                "follows_format": fmt,
                "extracted": [extract_answer(p) for p in predictions],
                "parsed": [v.predicted_value for v in verdicts],
                "parsed_reference": [v.reference_value for v in verdicts],
                "rule": [v.rule for v in verdicts],
            },
            "mode": mode,
            "rel_tol": rel_tol,
            "package": workflow_scripts.__name__,
        }
