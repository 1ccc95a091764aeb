"""Which filter profile a document gets: a per-document field, then its source, then its id, then
its content, then `clean.default_profile`.

- `clean.profile_field`: a field kept in the document's `meta` (download's `meta_fields`) whose value
  names the profile (`prose`, `code`, `none`), e.g. a `lang`/`kind` column of a jsonl dump.
- `clean.source_profiles`: source label glob -> profile (labels are the source's base name, e.g.
  `code.jsonl`, `books`, or the redacted URL of a remote source).
- `clean.profiles`: document id glob -> profile (suffix globs pick by file type; a trailing `:<n>`,
  a jsonl line or a part of a split file, is ignored when matching).
- `clean.detect_code`: when none of those say, text that reads as source code (at least half of its
  non-blank lines indented, ending like a block or statement (`{`, `}`, `);`, `):`), starting with a
  lower-case keyword of a common language, or a comment/preprocessor line) gets `code` instead of the
  default, so jsonl ids like `doc-0001` without a suffix are not all prose. Verse and dialogue stay
  prose: line-final `,`, `;` and `:` alone do not count.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any

from tasks.core.data_config import CleanConfig

PROFILES = ("prose", "code", "none")
_PART_SUFFIX = re.compile(r":\d+$")
_CODE_LINE = re.compile(
    r"^(\s{2,}|\t)\S"  # indented
    r"|(\{|\}|\);|\):|\];|=>|\\)\s*$"  # ends like a block, a statement or a call
    r"|^\s*(def|class|import|from|return|elif|except|async|await|function|const|let|var|public|private|"
    r"static|void|fn|pub|use|package|func)[\s(:]"  # starts with a keyword (lower case, as code has it)
    r"|^\s*(//|/\*|#!|#include|#define|@\w+)")  # comments, shebangs, preprocessor, decorators
CODE_LINE_SHARE = 0.5
"""A document is code by content when at least this share of its non-blank lines look like code."""


def looks_like_code(text: str, max_lines: int = 400) -> bool:
    """True when most non-blank lines (of the first `max_lines`) look like source code."""
    lines = [line for line in text.split("\n", max_lines)[:max_lines] if line.strip()]
    if len(lines) < 3:
        return False
    return sum(bool(_CODE_LINE.search(line)) for line in lines) >= CODE_LINE_SHARE * len(lines)


def choose_profile(doc_id: str, cfg: CleanConfig, source: str | None = None, meta: dict[str, Any] | None = None,
                   text: str | None = None) -> str:
    """The document's profile, by field, source label, id glob, then content (see the module doc)."""
    if cfg.profile_field and meta and str(meta.get(cfg.profile_field, "")).lower() in PROFILES:
        return str(meta[cfg.profile_field]).lower()
    if source is not None:
        for pattern, profile in cfg.source_profiles.items():
            if fnmatch.fnmatchcase(source, pattern):
                return profile
    bare = _PART_SUFFIX.sub("", doc_id)
    for pattern, profile in cfg.profiles.items():
        if fnmatch.fnmatchcase(doc_id, pattern) or fnmatch.fnmatchcase(bare, pattern):
            return profile
    if cfg.detect_code and text is not None and looks_like_code(text):
        return "code"
    return cfg.default_profile
