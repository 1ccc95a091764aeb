"""Filter profile selection: a per-document field, then the source label, then the id glob, then the
content (code detection), then the default; through the clean stage on a jsonl source whose ids have
no file suffix."""
import inspect
import json
import textwrap

from verse_corpus import VERSE, verse_text  # tests/helpers

from tasks.clean.profiles import choose_profile, looks_like_code
from tasks.clean.stage import run_clean
from tasks.core.data_config import CleanConfig, CorpusConfig
from tasks.download.stage import run_download

PYTHON = inspect.getsource(choose_profile)  # real Python source
C_CODE = textwrap.dedent("""\
    #include <stdio.h>
    static int add(int a, int b) {
        return a + b;
    }
    int main(void) {
        printf("%d\\n", add(2, 3));
        return 0;
    }
    """)
PROSE = ("The committee met on Tuesday to discuss the harbour. Several members argued that the old "
         "pier should be repaired before winter, and the chair agreed to ask for estimates.\n") * 6


def test_code_is_told_from_verse_dialogue_and_prose_by_content():
    assert looks_like_code(PYTHON) and looks_like_code(C_CODE)
    assert not looks_like_code(VERSE) and not looks_like_code(verse_text(20)) and not looks_like_code(PROSE)
    assert not looks_like_code("def f():\n    pass\n")  # too few lines to judge


def test_field_then_source_then_id_then_content_then_default():
    cfg = CleanConfig(profile_field="kind", source_profiles={"docs*.jsonl": "none"})
    assert choose_profile("x:a.py", cfg, "docs.jsonl", {"kind": "prose"}, PYTHON) == "prose"  # field first
    assert choose_profile("x:a.py", cfg, "docs.jsonl", {"kind": "poetry"}, PYTHON) == "none"  # not a profile: on
    assert choose_profile("x:a.py", cfg, "other", {}, PROSE) == "code"  # the id glob (*.py)
    assert choose_profile("doc-0001", cfg, "other", {}, PYTHON) == "code"  # content
    assert choose_profile("doc-0001", cfg, "other", {}, PROSE) == "prose"  # the default
    assert choose_profile("doc-0001", cfg.model_copy(update={"detect_code": False}), "other", {}, PYTHON) == "prose"


def test_clean_stage_picks_profiles_for_suffixless_jsonl_ids(tmp_path):
    rows = [{"id": "doc-0001", "text": PYTHON, "kind": ""}, {"id": "doc-0002", "text": PROSE, "kind": ""},
            {"id": "doc-0003", "text": C_CODE * 3, "kind": ""}, {"id": "doc-0004", "text": PROSE, "kind": "none"},
            {"id": "doc-0005", "text": VERSE, "kind": ""}]
    src = tmp_path / "dump.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws = str(tmp_path / "ws")
    raw = run_download(CorpusConfig(sources=[{"url": str(src), "meta_fields": ["kind"]}], max_bytes=None), ws)
    cleaned = run_clean(CleanConfig(workers=1, profile_field="kind", min_chars=16), raw, ws)
    assert cleaned.info["profiles"] == {"code": 2, "prose": 2, "none": 1}
    by_source = run_clean(CleanConfig(workers=1, source_profiles={"dump.jsonl": "none"}, min_chars=16), raw, ws)
    assert by_source.info["profiles"] == {"none": 5}
