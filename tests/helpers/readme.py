"""Commands copied from the README itself, so a test walks what a user copies and the README cannot
drift from what is tested."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def inline_code(containing: str) -> str:
    """The README's inline code span (`...`) that contains `containing`, whitespace collapsed
    (a span may wrap over lines); fails naming the text when there is none or several."""
    prose = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.M | re.S)  # fenced blocks out
    spans = [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", prose)]
    found = [s for s in spans if containing in s]
    assert len(found) == 1, f"README.md has {len(found)} inline code spans containing {containing!r}"
    return found[0]
