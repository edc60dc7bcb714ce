"""Generate the embedded FinQA-style sample dataset (deterministic, exact arithmetic).

The rows use the Fino1 columns (``Open-ended Verifiable Question``, ``Ground-True Answer``,
``Complex_CoT``, ``Response``) plus ``question_type`` so evaluation can report accuracy per
type. Every answer is computed with ``fractions.Fraction`` and rounded half-up with
``decimal``, so the reference is exact. The reasoning always follows the same short pattern
(read the cells, write the operation, state the result) because a 135M model learns a
consistent format in minutes of CPU training, while it cannot learn an inconsistent one.

Usage: python data/sample/make_sample.py [--rows 3000] [--seed 7] [--out data/sample/finqa_sample.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

ITEMS = [
    "Revenue",
    "Net income",
    "Operating expenses",
    "Cash",
    "Total assets",
    "Debt",
    "Dividends",
    "Capital expenditure",
    "Gross profit",
    "Inventory",
]
# Share of each question type: look-ups and comparisons dominate because they are what
# a small model can learn quickly; the harder types keep the benchmark honest.
TYPES = {
    "lookup": 0.30,
    "comparison": 0.14,
    "difference": 0.14,
    "sum": 0.10,
    "average": 0.08,
    "ratio": 0.08,
    "percent_change": 0.10,
    "cagr": 0.06,
}


def fmt(value: Fraction, places: int) -> str:
    """Round half-up to ``places`` decimals; drop a trailing ``.0`` only for integers."""
    d = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
        Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP
    )
    return f"{d:.{places}f}"


def make_table(rng: random.Random) -> tuple[list[int], dict[str, list[int]]]:
    first = rng.randint(2014, 2020)
    years = list(range(first, first + rng.choice([2, 3])))
    items = rng.sample(ITEMS, rng.choice([2, 3]))
    table = {item: [rng.randint(10, 400) for _ in years] for item in items}
    return years, table


def render_table(years: list[int], table: dict[str, list[int]]) -> str:
    lines = ["| Item | " + " | ".join(map(str, years)) + " |"]
    lines += [f"| {item} | " + " | ".join(map(str, vals)) + " |" for item, vals in table.items()]
    return "\n".join(lines)


def make_row(rng: random.Random, qtype: str) -> dict[str, str]:
    years, table = make_table(rng)
    item = rng.choice(list(table))
    vals = table[item]
    name = item.lower()
    i, j = sorted(rng.sample(range(len(years)), 2))
    a, b = vals[i], vals[j]
    ya, yb = years[i], years[j]
    read = f"{item} in {ya} is {a}. {item} in {yb} is {b}."
    if qtype == "lookup":
        k = rng.randrange(len(years))
        question = f"What was {name} in {years[k]}?"
        cot = f"{item} in {years[k]} is {vals[k]}."
        answer = str(vals[k])
    elif qtype == "comparison":
        while a == b:
            b = rng.randint(10, 400)
        vals[j] = b
        read = f"{item} in {ya} is {a}. {item} in {yb} is {b}."
        question = f"In which year was {name} higher, {ya} or {yb}?"
        higher = ya if a > b else yb
        cot = f"{read} {max(a, b)} is larger than {min(a, b)}, so {name} was higher in {higher}."
        answer = str(higher)
    elif qtype == "difference":
        question = f"What was the change in {name} from {ya} to {yb}?"
        cot = f"{read} Change = {b} - {a} = {b - a}."
        answer = str(b - a)
    elif qtype == "sum":
        question = f"What was the total {name} in {ya} and {yb} combined?"
        cot = f"{read} Total = {a} + {b} = {a + b}."
        answer = str(a + b)
    elif qtype == "average":
        question = f"What was the average {name} over {ya} and {yb}?"
        avg = Fraction(a + b, 2)
        cot = f"{read} Average = ({a} + {b}) / 2 = {a + b} / 2 = {fmt(avg, 1)}."
        answer = fmt(avg, 1)
    elif qtype == "ratio":
        other = rng.choice([x for x in table if x != item] or [item])
        c = table[other][j]
        question = f"What was the ratio of {name} to {other.lower()} in {yb}?"
        cot = f"{item} in {yb} is {b}. {other} in {yb} is {c}. Ratio = {b} / {c} = {fmt(Fraction(b, c), 2)}."
        answer = fmt(Fraction(b, c), 2)
    elif qtype == "percent_change":
        question = f"What was the percentage change in {name} from {ya} to {yb}?"
        pct = Fraction(b - a, a) * 100
        cot = (
            f"{read} Change = {b} - {a} = {b - a}. Percentage change = {b - a} / {a} * 100 = {fmt(pct, 1)}%."
        )
        answer = fmt(pct, 1) + "%"
    elif qtype == "cagr":
        i, j = 0, len(years) - 1
        a, b, ya, yb = vals[i], vals[j], years[i], years[j]
        n = j - i
        rate = (b / a) ** (1 / n) - 1  # float only for the root; rounded to 1 decimal below
        question = f"What was the compound annual growth rate of {name} from {ya} to {yb}?"
        cot = (
            f"{item} in {ya} is {a}. {item} in {yb} is {b}. There are {n} years. "
            f"CAGR = ({b} / {a})^(1/{n}) - 1 = {fmt(Fraction(rate * 100).limit_denominator(10**6), 1)}%."
        )
        answer = fmt(Fraction(rate * 100).limit_denominator(10**6), 1) + "%"
    else:
        raise ValueError(qtype)
    prompt = f"Table (in $ millions):\n{render_table(years, table)}\nQuestion: {question}"
    return {
        "Open-ended Verifiable Question": prompt,
        "Ground-True Answer": answer,
        "Complex_CoT": cot,
        "Response": f"The answer is {answer}.",
        "question_type": qtype,
    }


def generate(rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    types, weights = zip(*TYPES.items(), strict=False)
    return [make_row(rng, rng.choices(types, weights)[0]) for _ in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("finqa_sample.jsonl"))
    args = parser.parse_args()
    with args.out.open("w") as f:
        for row in generate(args.rows, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
