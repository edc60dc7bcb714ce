"""Markdown pieces the comparison and leaderboard reports share."""


def ci_text(ci: list[float] | tuple[float, float]) -> str:
    """A 95% CI as the reports print it: `[+0.123, +0.456]`."""
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table: `align` has one letter per column, l (left) or r (right)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows]
