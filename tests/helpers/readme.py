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


def fenced_commands(heading: str) -> list[str]:
    """The command lines of the first ```bash block after the README heading `heading` (comments and
    blank lines dropped); fails naming the heading when there is none."""
    text = README.read_text(encoding="utf-8")
    at = text.find(f"\n{heading}\n")
    assert at >= 0, f"README.md has no heading {heading!r}"
    block = re.search(r"^```bash\n(.*?)^```", text[at:], flags=re.M | re.S)
    assert block, f"README.md has no ```bash block after {heading!r}"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]
