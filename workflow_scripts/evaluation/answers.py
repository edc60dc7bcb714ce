"""Verifiable-answer checking: extract the final answer, parse it, judge it against the reference.

The final answer is the text after the last ``</think>``, after the last "answer is/:" cue, first
line. Numbers are parsed from the digits as written (``decimal.Decimal``, never floats):
thousands separators (1,234.5), currency ($, €, £), percent (12.5%, "12.5 percent"),
parenthesised negatives ((123) = -123, ($1.2 million)), scale words (thousand, k, million, mn,
m, billion, bn, b, trillion) and trailing units ("3.2 times", "15 days"). The answer's number
is the last number of the final answer.

`judge` decides, by the first rule that applies to the reference:

- empty reference: wrong (``empty-reference``).
- yes/no reference ("Yes", "No.", "yes, because ..."): the leading yes/no of the prediction must
  equal it (``yes-no``); "Yes." = "yes", "yes, because revenue grew" = "yes".
- numeric reference, mode ``precision`` (the default): the prediction, rounded half away from
  zero (``ROUND_HALF_UP``: 0.145 -> 0.15, -0.145 -> -0.15) to the decimals the reference shows,
  must equal the reference: 0.9737 = 0.97, 18.0 = 18, 18.04 = 18.0, 17.4 != 18, 703.1 != 705.25.
  The reference is tried in a few interpretations, each at the precision it implies:
    ``precision:Ndp``            both in the same units (scale words applied: "2.5 million" =
                                 2,500,000 at 0.1 million, rule ``precision:1e5``; "$1.2 billion"
                                 = "1,200 million"); a percent sign alone changes nothing
                                 (60.8% = 60.8);
    ``percent-as-fraction:Ndp``  a percent reference against a plain prediction read as a
                                 fraction: 60.8% (1 decimal) = 0.608 at 3 decimals;
    ``fraction-as-percent:Ndp``  a plain reference against a percent prediction: 0.25 = 25%;
    ``scale-omitted:Ndp``        a scale word on one side only, compared as written
                                 ("1200 million" = "1,200").
  ``Ndp`` is the decimals rounded to; ``1eK`` means rounded to a multiple of 10**K.
- numeric reference, mode ``relative``: the same interpretations, equal within ``rel_tol``
  relative (rule ``relative:0.01``, ``relative:0.01:percent-as-fraction``, ...).
- numeric reference and no number in the prediction: wrong (``no-number-in-prediction``), never
  "close enough".
- any other reference: normalised exact match (lower case, no punctuation or articles;
  ``text-exact``).

A `Judgement` records the verdict, the rule that decided it (for a wrong numeric answer: the
interpretation that came closest) and the parsed reference and prediction.
"""

import re
import string
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext

from workflow_scripts.config import schema_default

THINK_END = "</think>"
MODES = ("precision", "relative")
# The defaults of judge / is_correct are the config's (evaluation.answer_match / answer_tolerance).
DEFAULT_MODE = schema_default("evaluation.answer_match")
DEFAULT_REL_TOL = schema_default("evaluation.answer_tolerance")
# scale word -> (power of ten, canonical word)
SCALE_WORDS = {
    "thousand": (3, "thousand"),
    "k": (3, "thousand"),
    "million": (6, "million"),
    "millions": (6, "million"),
    "mn": (6, "million"),
    "m": (6, "million"),
    "billion": (9, "billion"),
    "billions": (9, "billion"),
    "bn": (9, "billion"),
    "b": (9, "billion"),
    "trillion": (12, "trillion"),
}
NUMBER_RE = re.compile(
    r"(?P<neg>-|−|\()?\s*(?P<cur>[$€£])?\s*(?P<neg2>-|−)?\s*"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"\s*(?P<close>\))?\s*(?P<pct>%|percent\b|per cent\b)?"
    r"(?:\s*(?P<scale>thousand|millions?|mn|m|billions?|bn|b|trillion|k)(?![a-z]))?"
    r"(?:\s*(?P<close2>\)))?",
    re.IGNORECASE,
)
ANSWER_CUE_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(?P<rest>.+)", re.IGNORECASE | re.DOTALL)
# a yes/no reference: the word alone or followed by punctuation ("Yes.", "No, because ...")
YES_NO_REFERENCE_RE = re.compile(r"^[\W_]*(?P<word>yes|no)[\W_]*(?:$|[,.;:!?)\-–—]\s*.*$)", re.I | re.S)
# a prediction's leading yes/no ("Yes.", "**No**", "yes because ...")
YES_NO_PREDICTION_RE = re.compile(r"^[\W_]*(?P<word>yes|no)\b", re.IGNORECASE)
ABS_SLACK = Decimal("1e-9")  # relative mode: absolute slack for comparisons with zero


@dataclass(frozen=True)
class Number:
    value: float  # as written, signed (25 for "25%", 1.2 for "$1.2 billion")
    percent: bool
    scale: float  # 1e6 for "million", else 1
    exact: Decimal  # value as written, exactly
    places: int  # decimals shown: "0.97" -> 2, "18" -> 0, "18.0" -> 1
    scale_exp: int = 0  # 6 for "million"
    unit: str = ""  # canonical scale word, "" for none

    @property
    def absolute(self) -> Decimal:
        """The value in base units: 2500000 for "2.5 million" (exact)."""
        return self.exact.scaleb(self.scale_exp)

    def __str__(self) -> str:
        text = str(self.exact) + ("%" if self.percent else "")
        return f"{text} {self.unit}" if self.unit else text


@dataclass(frozen=True)
class Judgement:
    correct: bool
    rule: str  # what decided, e.g. "precision:2dp", "yes-no", "no-number-in-prediction"
    reference_value: str | None = None  # parsed reference: "60.8%", "yes", normalised text
    predicted_value: str | None = None  # parsed prediction; None when nothing could be parsed


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
        exact = Decimal(raw)
        paren = m.group("neg") == "(" and ")" in (m.group("close"), m.group("close2"))
        if paren or m.group("neg") in ("-", "−") or m.group("neg2") in ("-", "−"):
            exact = -exact
        places = len(raw.split(".", 1)[1]) if "." in raw else 0
        # a lone "m"/"b"/"k" is only a scale right after the number, e.g. "$5m"
        scale_exp, unit = SCALE_WORDS.get((m.group("scale") or "").lower(), (0, ""))
        out.append(
            Number(
                value=float(exact),
                percent=bool(m.group("pct")),
                scale=10.0**scale_exp,
                exact=exact,
                places=places,
                scale_exp=scale_exp,
                unit=unit,
            )
        )
    return out


def parse_number(text: str) -> Number | None:
    """The answer's number: the last number of the extracted answer (units and words around it ignored)."""
    nums = parse_numbers(text)
    return nums[-1] if nums else None


def normalise_text(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _interpretations(pred: Number, ref: Number):
    """(name, prediction, reference, quantum): the readings under which the two may be equal.

    The quantum is the precision the reference shows in that reading (0.01 for "0.97", 1e5 for
    "2.5 million", 0.001 for "60.8%" read as a fraction).
    """
    shown = Decimal(1).scaleb(-ref.places)
    p, r, q = pred.absolute, ref.absolute, shown.scaleb(ref.scale_exp)
    yield "precision", p, r, q
    if ref.percent and not pred.percent:
        yield "percent-as-fraction", p, r.scaleb(-2), q.scaleb(-2)
    if pred.percent and not ref.percent:
        yield "fraction-as-percent", p.scaleb(-2), r, q
    if (pred.scale_exp == 0) != (ref.scale_exp == 0):
        yield "scale-omitted", pred.exact, ref.exact, shown


def _round(value: Decimal, quantum: Decimal) -> Decimal | None:
    """`value` rounded half away from zero to a multiple of `quantum` (a power of ten)."""
    try:
        return value.quantize(quantum, rounding=ROUND_HALF_UP)
    except InvalidOperation:  # more digits than the context holds: not a sensible answer
        return None


def _places_label(quantum: Decimal) -> str:
    exp = quantum.adjusted()
    return f"{-exp}dp" if exp <= 0 else f"1e{exp}"


def _judge_numbers(pred: Number, ref: Number, mode: str, rel_tol: float) -> tuple[bool, str]:
    tol = Decimal(str(rel_tol))
    closest = None
    with localcontext() as ctx:
        ctx.prec = 60
        for name, p, r, q in _interpretations(pred, ref):
            if mode == "precision":
                rounded = _round(p, q)
                ok = rounded is not None and rounded == r
                rule = f"{name}:{_places_label(q)}"
            else:
                ok = abs(p - r) <= tol * max(abs(p), abs(r)) + ABS_SLACK
                rule = f"relative:{rel_tol:g}" + ("" if name == "precision" else f":{name}")
            if ok:
                return True, rule
            gap = abs(p - r) / max(abs(r), q)
            if closest is None or gap < closest[0]:
                closest = (gap, rule)
    return False, closest[1]


def judge(
    prediction: str, reference: str, mode: str = DEFAULT_MODE, rel_tol: float = DEFAULT_REL_TOL
) -> Judgement:
    """Whether `prediction` answers like `reference`, and by which rule (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"answer matching mode must be one of {MODES}, not {mode!r}")
    ref_answer = extract_answer(reference)
    pred_answer = extract_answer(prediction)
    if not ref_answer:
        return Judgement(False, "empty-reference", None, pred_answer or None)
    yes_no = YES_NO_REFERENCE_RE.match(ref_answer)
    if yes_no:
        ref_word = yes_no.group("word").lower()
        pred_match = YES_NO_PREDICTION_RE.match(pred_answer)
        pred_word = pred_match.group("word").lower() if pred_match else None
        return Judgement(pred_word == ref_word, "yes-no", ref_word, pred_word)
    ref_num = parse_number(ref_answer)
    if ref_num is None:
        ref_text, pred_text = normalise_text(ref_answer), normalise_text(pred_answer)
        return Judgement(bool(ref_text) and pred_text == ref_text, "text-exact", ref_text, pred_text or None)
    pred_num = parse_number(pred_answer)
    if pred_num is None:
        return Judgement(False, "no-number-in-prediction", str(ref_num), None)
    correct, rule = _judge_numbers(pred_num, ref_num, mode, rel_tol)
    return Judgement(correct, rule, str(ref_num), str(pred_num))


def is_correct(
    prediction: str, reference: str, rel_tol: float = DEFAULT_REL_TOL, mode: str = DEFAULT_MODE
) -> bool:
    """`judge(...).correct`."""
    return judge(prediction, reference, mode, rel_tol).correct


def follows_format(prediction: str) -> bool:
    """`<think>...</think>` followed by a non-empty answer."""
    start = prediction.find("<think>")
    end = prediction.find(THINK_END)
    return 0 <= start < end and bool(prediction[end + len(THINK_END) :].strip())
