"""The user-facing tables, apart from the planning code they print: the decision table and single plans
(``python -m iso_kernels plan``, ``tables.decision``) and the paper's settings (``python -m iso_kernels
simulate``, ``tables.paper``). The CLI imports each only for its own subcommand."""

import argparse


def render_table(cells, markdown=False) -> str:
    """Rows of strings, the first the header, as a Markdown table or right-aligned plain columns."""
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in cells]
        lines.insert(1, "|" + "|".join("---" for _ in cells[0]) + "|")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells)


def comma_list(kind):
    """An argparse type: ``1,2,4`` -> [1, 2, 4] of ``kind``, at least one."""

    def parse(text):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values
    return parse
