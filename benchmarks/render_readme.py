"""Copy the generated tables in ``benchmarks/results/*.md`` into README.md between marker comments.

README.md holds blocks like::

    <!-- results:adapter_step -->
    ...replaced by benchmarks/results/adapter_step.md...
    <!-- /results:adapter_step -->

    python benchmarks/render_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(readme: Path = ROOT / "README.md", results: Path = ROOT / "benchmarks" / "results") -> list[str]:
    """Replace every ``<!-- results:NAME -->`` block with ``results/NAME.md``; returns the names filled in."""
    text = readme.read_text()
    filled = []

    def fill(match: re.Match) -> str:
        name = match.group(1)
        source = results / f"{name}.md"
        if not source.exists():
            return match.group(0)
        filled.append(name)
        # A result file's own headings sit below the README's "## Results" section.
        body = re.sub(
            r"^(#{1,3}) ", lambda h: "#" * (len(h.group(1)) + 3) + " ", source.read_text().strip(), flags=re.M
        )
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    text = re.sub(r"<!-- results:([\w-]+) -->.*?<!-- /results:\1 -->", fill, text, flags=re.S)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(readme)
    return filled


if __name__ == "__main__":
    print("filled:", ", ".join(render()) or "nothing")
