"""FinQA-length prompts for the generation benchmark, made deterministically from the sample's.

Real FinQA prompts are ~400-900 tokens: a stretch of filing text, a table, more text, then the
question. The sample's prompts are ~150 tokens (the table and the question only), so a generator
tuned on them alone can look fast where users' prompts are dominated by prefill. Each long
prompt here is one sample prompt (same chat template, table and question, so the model is asked
what it was asked before) with seeded filing-style paragraphs inserted before the table and
between the table and the question, until the prompt reaches a length drawn uniformly from
`lengths` tokens. Nothing is shipped: the same seed gives the same prompts.
"""

import random

TABLE_MARK = "Table (in $ millions):"
QUESTION_MARK = "\nQuestion:"
ITEMS = [
    "revenue",
    "operating income",
    "net interest expense",
    "selling, general and administrative expenses",
    "cash provided by operating activities",
    "capital expenditures",
    "long-term debt",
    "goodwill",
    "deferred tax assets",
    "accounts receivable",
]
CAUSES = [
    "higher volumes in the industrial segment",
    "the timing of customer payments",
    "the acquisition completed in the third quarter",
    "lower commodity prices",
    "foreign currency translation",
    "restructuring charges recorded during the year",
    "the refinancing of senior notes",
    "increased pension contributions",
]
TEMPLATES = [
    "{Item} {moved} {pct}% in {year} compared with {prev}, primarily due to {cause}.",
    "As of December 31, {year}, {item} was ${amount} million, compared with ${amount2} million as of "
    "December 31, {prev}.",
    "Management believes that {item} will remain sufficient to fund operations; the change from {prev} "
    "reflects {cause}.",
    "The following table presents {item} and related amounts for the periods indicated, which are "
    "derived from our audited consolidated financial statements.",
    "In {year}, we recorded ${amount} million related to {cause}, which is included in {item}.",
]


def sentence(rng: random.Random) -> str:
    year = rng.randint(2009, 2021)
    item = rng.choice(ITEMS)
    return rng.choice(TEMPLATES).format(
        Item=item.capitalize(),
        item=item,
        moved=rng.choice(["increased", "decreased"]),
        pct=rng.randint(1, 40),
        year=year,
        prev=year - 1,
        cause=rng.choice(CAUSES),
        amount=rng.randint(5, 9000),
        amount2=rng.randint(5, 9000),
    )


def lengthen(prompt: str, target: int, count, rng: random.Random) -> str:
    """`prompt` with paragraphs before its table and before its question, ~`target` tokens long."""
    if TABLE_MARK not in prompt or QUESTION_MARK not in prompt:
        raise ValueError(f"not a sample prompt (no {TABLE_MARK!r} or question): {prompt[:80]!r}")
    head, rest = prompt.split(TABLE_MARK, 1)
    table, question = rest.split(QUESTION_MARK, 1)
    before, after = [], []
    text = prompt
    while count(text) < target:
        (before if rng.random() < 0.6 else after).append(sentence(rng))
        text = (
            f"{head}{' '.join(before)}\n\n{TABLE_MARK}{table}\n\n{' '.join(after)}{QUESTION_MARK}{question}"
        )
    return text


def long_prompts(prompts: list[str], tok, lengths=(400, 900), seed: int = 0) -> list[str]:
    """One long prompt per sample prompt, each ~uniform(`lengths`) tokens under `tok`."""
    rng = random.Random(seed)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return [lengthen(p, rng.randint(*lengths), count, rng) for p in prompts]
