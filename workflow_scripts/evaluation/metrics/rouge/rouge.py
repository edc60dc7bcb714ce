"""ROUGE-1/2/L/Lsum with Google's rouge-score, as an `evaluate` module that loads offline.

`evaluate.load("rouge")` fetches its script from the Hub; this module is loaded by path.
Returns the corpus means and the per-example F-measures (for paired bootstrap CIs).
"""

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE F-measures (rouge-score, stemmed), corpus mean and per example.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, use_stemmer=True):
        scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=use_stemmer)
        per_example = {t: [] for t in ROUGE_TYPES}
        for pred, ref in zip(predictions, references, strict=False):
            # rougeLsum splits summaries on newlines
            scores = scorer.score(ref, pred)
            for t in ROUGE_TYPES:
                per_example[t].append(scores[t].fmeasure)
        n = max(len(predictions), 1)
        result = {t: sum(v) / n for t, v in per_example.items()}
        result["per_example"] = per_example
        return result


_ = scoring  # rouge-score's aggregation module; imported so evaluate records the dependency
