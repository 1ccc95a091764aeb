"""Verse, dialogue and headings (Shakespeare, public domain) for the data stages' tests: text the C4
line rule removes line by line, and a long plain-text file built from it."""
from __future__ import annotations

from pathlib import Path

SONNET = """SONNET XVIII

Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""
DIALOGUE = """ACT II

SCENE II. Capulet's orchard.

ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.
"""
VERSE = SONNET + "\n" + DIALOGUE
"""25 non-blank lines: headings, speaker tags and verse; C4's line rule (`c4_unit: line`) removes
18 of them, the default `paragraph` unit none."""


def verse_text(paragraphs: int) -> str:
    """A long play-like text: numbered scenes of dialogue, paragraphs separated by blank lines."""
    speakers = ["ROMEO", "JULIET", "NURSE", "FRIAR LAURENCE"]
    lines = SONNET.split("\n")[2:16] + DIALOGUE.split("\n")[5:7] + DIALOGUE.split("\n")[9:13]
    out = []
    for i in range(paragraphs):
        if i % 12 == 0:
            out.append(f"SCENE {i // 12 + 1}. A room in the house.\n")
        take = [lines[(i * 3 + k) % len(lines)] for k in range(2 + i % 5)]
        out.append(f"{speakers[i % 4]}:\n" + "\n".join(take[:-1]) + f"\n{take[-1].rstrip(',;:')}.\n")
    return "\n".join(out)


def write_verse_file(path: Path, paragraphs: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verse_text(paragraphs), encoding="utf-8")
    return path
