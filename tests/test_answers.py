"""Answer judging: numbers at the reference's precision (default) or a relative tolerance, yes/no,
text, unparseable predictions, and the parsed values and rule recorded per prediction row."""

import json

import pandas as pd
import pytest
from helpers import with_defaults

from workflow_scripts.evaluation import compare as compare_stage
from workflow_scripts.evaluation.answers import Judgement, is_correct, judge, parse_number
from workflow_scripts.stage import Job, StageError


def ref(answer: str) -> str:
    """A reference as the training data writes it."""
    return f"The answer is {answer}."


def pred(answer: str) -> str:
    """A model answer: reasoning, then the answer line."""
    return f"<think>\nRevenue and costs from the table.\n</think>\nThe answer is {answer}."


# (reference, prediction, expected, mode)
CASES = [
    # precision: rounded to the decimals the reference shows
    ("0.97", "0.9737", True, "precision"),  # debt-to-equity ratio, 2 decimals shown
    ("0.97", "0.9750", False, "precision"),  # rounds to 0.98
    ("0.97", "1", False, "precision"),  # less precise than the reference
    ("705.25", "$703.1", False, "precision"),  # within 1% but a different number
    ("$705.25 million", "705.25", True, "precision"),  # scale omitted by the prediction
    ("18", "17.4", False, "precision"),
    ("18", "17.5", True, "precision"),  # half away from zero
    ("18", "18.0", True, "precision"),
    ("18.0", "18.04", True, "precision"),  # 1 decimal shown
    ("18.0", "18.05", False, "precision"),  # rounds to 18.1
    ("0.15", "0.145", True, "precision"),  # exactly half: up, no float drift (0.145 is 0.14499... as float)
    ("-0.15", "-0.145", True, "precision"),  # half away from zero for negatives too
    ("0.15", "0.1449", False, "precision"),
    # percent / fraction, at the precision the reference implies in each reading
    ("60.8%", "0.608", True, "precision"),  # 1 decimal of percent = 3 decimals of fraction
    ("60.8%", "0.6084", True, "precision"),
    ("60.8%", "0.61", False, "precision"),  # 61.0% is not 60.8%
    ("60.8%", "60.8", True, "precision"),  # percent sign omitted
    ("60.8%", "60.84%", True, "precision"),
    ("60.8%", "61%", False, "precision"),
    ("0.25", "25%", True, "precision"),  # fraction reference, percent prediction
    ("12.5 percent", "12.5%", True, "precision"),
    ("-3.2%", "-0.032", True, "precision"),
    # negatives, separators, currency
    ("(1,234)", "-1234", True, "precision"),
    ("-1,234", "(1,234)", True, "precision"),
    ("(1,234)", "1234", False, "precision"),  # the sign matters
    ("$1,234,567", "1234567", True, "precision"),
    ("€7.50", "7.5", True, "precision"),
    # scale words
    ("2.5 million", "2,500,000", True, "precision"),
    ("2.5 million", "2,460,000", True, "precision"),  # 2.5 million is shown to 0.1 million
    ("2.5 million", "2,440,000", False, "precision"),
    ("$1.2 billion", "1,200 million", True, "precision"),
    ("$1.2 billion", "$1.2bn", True, "precision"),
    ("$1.2 billion", "1.2 million", False, "precision"),  # both scaled, different scales
    ("1200 million", "1,200", True, "precision"),  # scale omitted by the prediction
    ("$450k", "450,000", True, "precision"),
    # relative: the old behaviour, answer_tolerance relative
    ("705.25", "$703.1", True, "relative"),  # 0.3% off: right within 1%
    ("705.25", "$690", False, "relative"),  # 2.2% off
    ("30", "30.2", True, "relative"),
    ("60.8%", "0.61", True, "relative"),
    ("0.25", "25%", True, "relative"),
    ("(1,234)", "-1234", True, "relative"),
    ("$1.2 billion", "1,200 million", True, "relative"),
    # yes/no and text answers, either mode
    ("Yes", "Yes.", True, "precision"),
    ("yes", "YES", True, "relative"),
    ("No", "no, because operating cash flow fell in 2019", True, "precision"),
    ("Yes", "No, revenue fell", False, "precision"),
    ("No", "Not necessarily", False, "precision"),  # "not" is not "no"
    ("Yes", "It depends on the year", False, "precision"),
    ("Net income", "net income", True, "precision"),
    ("Net income", "revenue", False, "precision"),
    # unparseable predictions are wrong, never close enough
    ("705.25", "I cannot determine this from the table", False, "precision"),
    ("705.25", "I cannot determine this from the table", False, "relative"),
    ("705.25", "", False, "precision"),
]


@pytest.mark.parametrize("reference, prediction, expected, mode", CASES)
def test_judge_table(reference, prediction, expected, mode):
    j = judge(pred(prediction), ref(reference), mode, 0.01)
    assert j.correct is expected, j


def test_half_up_is_decimal_not_float():
    # round(0.145, 2) == 0.14 in floats; the digits as written round half away from zero
    assert round(0.145, 2) == 0.14
    assert judge("0.145", "0.15").correct
    assert not judge("0.145", "0.14").correct
    assert judge("1.0045", "1.005").correct  # 1.0045 -> 1.005 (3 decimals)
    assert not judge("1.0044", "1.005").correct


@pytest.mark.parametrize(
    "reference, prediction, rule, reference_value, predicted_value",
    [
        ("0.97", "0.9737", "precision:2dp", "0.97", "0.9737"),
        ("705.25", "$703.1", "precision:2dp", "705.25", "703.1"),
        ("60.8%", "0.608", "percent-as-fraction:3dp", "60.8%", "0.608"),
        ("0.25", "25%", "fraction-as-percent:2dp", "0.25", "25%"),
        ("(1,234)", "-1234", "precision:0dp", "-1234", "-1234"),
        ("18", "18.0", "precision:0dp", "18", "18.0"),
        ("2.5 million", "2,500,000", "precision:1e5", "2.5 million", "2500000"),
        ("$1.2 billion", "1,200 million", "precision:1e8", "1.2 billion", "1200 million"),
        ("1200 million", "1,200", "scale-omitted:0dp", "1200 million", "1200"),
        # a wrong answer records the reading that came closest
        ("60.8%", "0.7", "percent-as-fraction:3dp", "60.8%", "0.7"),
        ("60.8%", "61", "precision:1dp", "60.8%", "61"),
        ("Yes", "yes, because margins rose", "yes-no", "yes", "yes"),
        ("No", "Not necessarily", "yes-no", "no", None),
        ("Net income", "Net income.", "text-exact", "net income", "net income"),
        ("705.25", "I don't know", "no-number-in-prediction", "705.25", None),
    ],
)
def test_judgement_records_rule_and_parsed_values(
    reference, prediction, rule, reference_value, predicted_value
):
    j = judge(pred(prediction), ref(reference))
    assert (j.rule, j.reference_value, j.predicted_value) == (rule, reference_value, predicted_value)


def test_relative_mode_rules_and_tolerance():
    j = judge(pred("$703.1"), ref("705.25"), "relative", 0.01)
    assert j == Judgement(True, "relative:0.01", "705.25", "703.1")
    assert judge(pred("0.608"), ref("60.8%"), "relative", 0.01).rule == "relative:0.01:percent-as-fraction"
    # the tolerance is the knob: 0.3% off is wrong at 0.1%
    assert not judge(pred("$703.1"), ref("705.25"), "relative", 0.001).correct
    assert judge(pred("$703.1"), ref("705.25"), "relative", 0.001).rule == "relative:0.001"
    # and precision ignores it
    assert not judge(pred("$703.1"), ref("705.25"), "precision", 0.5).correct


def test_empty_reference_and_unknown_mode():
    assert judge(pred("3"), "") == Judgement(False, "empty-reference", None, "3")
    with pytest.raises(ValueError, match="precision"):
        judge(pred("3"), ref("3"), "approximate")


def test_is_correct_is_judge_correct():
    assert is_correct(pred("0.9737"), ref("0.97"))
    assert not is_correct(pred("$703.1"), ref("705.25"))  # precision by default
    assert is_correct(pred("$703.1"), ref("705.25"), 0.01, mode="relative")


def test_parse_number_keeps_the_digits_as_written():
    n = parse_number("($1,234.50 million)")
    assert (str(n.exact), n.places, n.scale_exp, n.unit, str(n)) == (
        "-1234.50",
        2,
        6,
        "million",
        "-1234.50 million",
    )
    assert n.value == -1234.5 and n.scale == 1e6


def test_score_records_parsed_answer_and_rule_per_example():
    from workflow_scripts.evaluation.evaluate_model import score

    predictions = [pred("0.9737"), pred("$703.1"), "<think>x</think>\nNo idea.", pred("yes")]
    references = [ref("0.97"), ref("705.25"), ref("12.5%"), ref("Yes")]
    cfg = {"metrics": ["answer_accuracy"], "answer_match": "precision", "answer_tolerance": 0.01}
    metrics, per_example = score(predictions, references, cfg)
    assert per_example["correct"] == [True, False, False, True]
    assert metrics["answer_accuracy"] == 0.5
    assert per_example["parsed_answer"] == ["0.9737", "703.1", None, "yes"]
    assert per_example["parsed_reference"] == ["0.97", "705.25", "12.5%", "yes"]
    assert per_example["answer_rule"] == [
        "precision:2dp",
        "precision:2dp",
        "no-number-in-prediction",
        "yes-no",
    ]
    _, relative = score(predictions, references, {**cfg, "answer_match": "relative"})
    assert relative["correct"] == [True, True, False, True]
    assert relative["answer_rule"][1] == "relative:0.01"


def test_prediction_rows_carry_parsed_answer_and_rule(
    tmp_path, tiny_model_dir, tiny_tokenizer, resolved_config
):
    from workflow_scripts.evaluation import evaluate_model

    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": f"q{i}"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(2)
    ]
    test = tmp_path / "test.parquet"
    pd.DataFrame({"prompt_text": prompts, "reference": ["The answer is 705.25.", "Yes."]}).to_parquet(test)
    cfg = with_defaults(
        "evaluation",
        {"metrics": ["answer_accuracy"], "max_new_tokens": 4, "batch_size": 2, "answer_tolerance": 0.01},
    )

    def evaluate(settings, name):
        return evaluate_model.run(
            Job(
                input={"model_dir": str(tiny_model_dir), "prompts": str(test)},
                output={
                    "evaluation": str(tmp_path / f"{name}.json"),
                    "predictions": str(tmp_path / f"{name}.jsonl"),
                },
                params={"evaluation": settings, "label": "base"},
            )
        )

    result = evaluate(cfg, "p")
    assert result["answer_matching"] == {"mode": "precision", "rel_tol": 0.01}
    rows = [json.loads(x) for x in open(tmp_path / "p.jsonl")]
    assert [r["parsed_reference"] for r in rows] == ["705.25", "yes"]
    for row in rows:
        assert {"parsed_answer", "answer_rule", "correct"} <= set(row)
        assert row["correct"] == judge(row["prediction"], row["reference"]).correct
    # an unknown mode never reaches the stage: the schema refuses it when the workflow loads
    from workflow_scripts.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation.answer_match"):
        resolved_config({"evaluation": {"answer_match": "approximate"}})


def test_compare_counts_unparsed_answers_and_refuses_mixed_matching():
    base = [
        {"prompt": "p0", "correct": False, "answer_rule": "no-number-in-prediction"},
        {"prompt": "p1", "correct": False, "answer_rule": "no-number-in-prediction"},
        {"prompt": "p2", "correct": True, "answer_rule": "precision:2dp"},
    ]
    tuned = [
        {"prompt": "p0", "correct": True, "answer_rule": "precision:0dp"},
        {"prompt": "p1", "correct": False, "answer_rule": "precision:2dp"},
        {"prompt": "p2", "correct": True, "answer_rule": "percent-as-fraction:3dp"},
    ]
    report = compare_stage.compare(base, tuned, 200, 0, None)
    assert report["unparsed_answers"] == {"base": 2, "finetuned": 0}
    precision = {"answer_matching": {"mode": "precision", "rel_tol": 0.01}}
    relative = {"answer_matching": {"mode": "relative", "rel_tol": 0.01}}
    assert compare_stage.answer_matching(precision, precision) == precision["answer_matching"]
    assert compare_stage.answer_matching({}, {}) is None  # evaluations from before the setting
    with pytest.raises(StageError, match="same evaluation.answer_match"):
        compare_stage.answer_matching(precision, relative)
