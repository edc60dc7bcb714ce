"""Verifiable-answer checking: extract the final answer, parse numbers robustly, compare.

Numbers: thousands separators (1,234.5), currency ($, €, £), percent (12.5%, "12.5 percent"),
parenthesised negatives ((123) = -123), scale words (million, billion, thousand, bn, m, k),
trailing units ("3.2 times", "15 days"). Two numbers match within a relative tolerance; a
percent and a plain number also match as fraction and percent (0.25 vs 25%). A reference
that is not a number falls back to normalised exact match.
"""

import re
import string
from dataclasses import dataclass

THINK_END = "</think>"
SCALES = {
    "thousand": 1e3,
    "k": 1e3,
    "million": 1e6,
    "millions": 1e6,
    "mn": 1e6,
    "m": 1e6,
    "billion": 1e9,
    "billions": 1e9,
    "bn": 1e9,
    "b": 1e9,
    "trillion": 1e12,
}
NUMBER_RE = re.compile(
    r"(?P<neg>-|−|\()?\s*(?P<cur>[$€£])?\s*(?P<neg2>-|−)?\s*"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"\s*(?P<close>\))?\s*(?P<pct>%|percent\b|per cent\b)?"
    r"(?:\s*(?P<scale>thousand|millions?|mn|m|billions?|bn|b|trillion|k)(?![a-z]))?",
    re.IGNORECASE,
)
ANSWER_CUE_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(?P<rest>.+)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Number:
    value: float  # as written (25 for "25%")
    percent: bool
    scale: float  # 1e6 for "million", else 1


def final_segment(text: str) -> str:
    """The part after the reasoning: text after the last </think>, else the whole text."""
    return text.rsplit(THINK_END, 1)[1] if THINK_END in text else text


def extract_answer(text: str) -> str:
    """The final answer string: what follows the last 'answer is/:' cue, else the final segment."""
    seg = final_segment(text).strip()
    matches = list(ANSWER_CUE_RE.finditer(seg))
    if matches:
        seg = matches[-1].group("rest")
    first_line = seg.strip().split("\n", 1)[0].strip()
    return first_line.rstrip(".").strip() if first_line else ""


def parse_numbers(text: str) -> list[Number]:
    out = []
    for m in NUMBER_RE.finditer(text):
        raw = m.group("num").replace(",", "")
        value = float(raw)
        paren = m.group("neg") == "(" and m.group("close") == ")"
        if paren or m.group("neg") in ("-", "−") or m.group("neg2") in ("-", "−"):
            value = -value
        scale_word = (m.group("scale") or "").lower()
        # a lone "m"/"b"/"k" is only a scale right after the number, e.g. "$5m"
        scale = SCALES.get(scale_word, 1.0)
        out.append(Number(value=value, percent=bool(m.group("pct")), scale=scale))
    return out


def parse_number(text: str) -> Number | None:
    """The answer's number: the last number of the extracted answer (units and words around it ignored)."""
    nums = parse_numbers(text)
    return nums[-1] if nums else None


def close(a: float, b: float, rel_tol: float) -> bool:
    return abs(a - b) <= rel_tol * max(abs(a), abs(b)) + 1e-9


def numbers_match(pred: Number, ref: Number, rel_tol: float) -> bool:
    pairs = [(pred.value * pred.scale, ref.value * ref.scale), (pred.value, ref.value)]
    for p, r in pairs:
        if close(p, r, rel_tol):
            return True
        if pred.percent != ref.percent:
            if pred.percent and close(p / 100, r, rel_tol):
                return True
            if ref.percent and close(p, r / 100, rel_tol):
                return True
    return False


def normalise_text(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, reference: str, rel_tol: float = 0.01) -> bool:
    ref_answer = extract_answer(reference)
    pred_answer = extract_answer(prediction)
    ref_num = parse_number(ref_answer)
    if ref_num is None:
        return bool(ref_answer) and normalise_text(pred_answer) == normalise_text(ref_answer)
    pred_num = parse_number(pred_answer)
    return pred_num is not None and numbers_match(pred_num, ref_num, rel_tol)


def follows_format(prediction: str) -> bool:
    """`<think>...</think>` followed by a non-empty answer."""
    start = prediction.find("<think>")
    end = prediction.find(THINK_END)
    return 0 <= start < end and bool(prediction[end + len(THINK_END) :].strip())
