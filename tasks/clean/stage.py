"""Clean: repair broken Unicode, normalize, and reject low-quality documents by per-source profile.

Each raw shard becomes `docs-NNNNN.parquet` (id, text, source) plus a ledger
`rejected/rejected-NNNNN.parquet` (id, source, reason, value, n_chars, profile): one row per rejected
document with the measured value that failed its rule (`tasks/clean/filters.py`). ftfy runs only on lines
its badness check flags, with the fixes that would rewrite intact source code switched off; control
characters and trailing blanks go; a Python file that parsed before cleaning keeps its AST or is
left as it was. Non-blank lines are counted per source (in, and removed per line rule or with a
rejected document); a source that loses more than half of them gets a warning naming the rules, in
the manifest (`warnings`), the report and the task's log.

Shards are cleaned independently in worker processes (`tasks/core/units.py`); each shard's output is
stored under a fingerprint of its own input shard's sha256, the config and the code, then linked
into the stage directory. So when the corpus grows, only new shards are cleaned.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tasks.clean.filters import LINE_RULES, reasons_for
from tasks.clean.shard import LENGTH_BINS, clean_shard
from tasks.core.data_config import CleanConfig
from tasks.core.protocol import Computed, Stage, StageResult, check_accounting, file_entry
from tasks.core.units import Mapper, link, plan_over, run_over, unit_mapper, unit_outputs

STAGE = Stage("clean", version=5, module=__name__, section="clean", inputs=("download",),
              info_keys=("repaired", "ast_reverted", "lines_removed", "profiles", "shards_run",
                         "shards_reused", "timings", "lines_by_source", "warnings", "length_hist"))
WARN_REMOVED_FRACTION = 0.5
"""A source that loses more than this share of its non-blank lines gets a warning in the report."""


def plan(cfg: CleanConfig, upstream: StageResult, workspace: str) -> tuple[str, Path]:
    return plan_over(STAGE, cfg, upstream, workspace)


def active_reasons(cfg: CleanConfig) -> tuple[str, ...]:
    return reasons_for([cfg.default_profile, *cfg.profiles.values()])


def shard_jobs(cfg: CleanConfig, upstream: StageResult, workspace: str) -> list[tuple]:
    """One `clean_shard` job per raw shard, each with its own content-addressed output directory."""
    units = Path(workspace) / STAGE.name / "shards"
    return [(cfg, path, out, active_reasons(cfg))
            for path, out in unit_outputs(cfg, upstream, STAGE.code(), "shard-", units)]


def run_clean(cfg: CleanConfig, upstream: StageResult, workspace: str,
              mapper: Mapper | None = None) -> StageResult:
    """Clean every raw shard of `upstream` into Parquet documents plus a rejection ledger."""
    return run_over(STAGE, _clean, cfg, upstream, workspace, mapper)


def _clean(cfg: CleanConfig, upstream: StageResult, workspace: str, directory: Path,
           mapper: Mapper | None) -> Computed:
    """Run (or reuse) the shard units, then link their outputs into the stage directory."""
    started = time.time()
    jobs = shard_jobs(cfg, upstream, workspace)
    summaries = unit_mapper(mapper, cfg.workers)(clean_shard, jobs)
    reasons = active_reasons(cfg)
    counts = {"docs_in": 0, "kept": 0, **{f"rejected:{r}": 0 for r in reasons}}
    info: dict[str, Any] = {"repaired": 0, "ast_reverted": 0, "profiles": {},
                            "lines_removed": dict.fromkeys(LINE_RULES, 0), "shards_run": 0,
                            "shards_reused": 0, "lines_by_source": {},
                            "length_hist": {"in": [0] * LENGTH_BINS, "kept": [0] * LENGTH_BINS}}
    entries, unit_seconds, cleaning = [], 0.0, 0.0
    for i, (job, summary) in enumerate(zip(jobs, summaries)):
        for key, value in summary["counts"].items():
            counts[key] += value
        for key in ("repaired", "ast_reverted"):
            info[key] += summary[key]
        for rule, n in summary["lines_removed"].items():
            info["lines_removed"][rule] += n
        for side, hist in summary["length_hist"].items():
            info["length_hist"][side] = [a + b for a, b in zip(info["length_hist"][side], hist)]
        for name, n in summary["profiles"].items():
            info["profiles"][name] = info["profiles"].get(name, 0) + n
        for source, acc in summary["lines_by_source"].items():
            into = info["lines_by_source"].setdefault(source, {"lines": 0, "removed": {},
                                                               "profiles": {}})
            into["lines"] += acc["lines"]
            for key in ("removed", "profiles"):
                for name, n in acc[key].items():
                    into[key][name] = into[key].get(name, 0) + n
        info["shards_reused" if summary["reused"] else "shards_run"] += 1
        if not summary["reused"]:
            unit_seconds += summary["seconds"]
            cleaning += summary["cleaning_seconds"]
        unit = Path(job[2])
        docs, rejected = directory / f"docs-{i:05d}.parquet", directory / "rejected" / f"rejected-{i:05d}.parquet"
        link(unit / "docs.parquet", docs)
        link(unit / "rejected.parquet", rejected)
        entries += [file_entry(docs, directory, rows=summary["counts"]["kept"]),
                    file_entry(rejected, directory, rows=summary["counts"]["docs_in"] - summary["counts"]["kept"])]
    check_accounting(counts, counts["docs_in"], ["kept", *(f"rejected:{r}" for r in reasons)],
                     f"clean {directory}")
    info["lines_by_source"] = dict(sorted(info["lines_by_source"].items()))
    info["warnings"] = removal_warnings(info["lines_by_source"])
    info["timings"] = {"clean_shards_cpu_s": round(unit_seconds, 3),
                       "repair_and_filters_s": round(cleaning, 3),
                       "read_and_write_s": round(unit_seconds - cleaning, 3),
                       "wall_s": round(time.time() - started, 3)}
    return Computed(counts, entries, info)


def removal_warnings(lines_by_source: dict[str, dict]) -> list[str]:
    """One line per source whose documents lost more than `WARN_REMOVED_FRACTION` of their
    non-blank lines (to line rules, or with the documents rejected), naming the rules responsible."""
    warnings = []
    for source, acc in lines_by_source.items():
        lines, removed = acc["lines"], sum(acc["removed"].values())
        if not lines or removed / lines <= WARN_REMOVED_FRACTION:
            continue
        rules = sorted(acc["removed"].items(), key=lambda kv: (-kv[1], kv[0]))
        profiles = ", ".join(sorted(acc["profiles"]))
        warnings.append(
            f"WARNING: clean removed {removed / lines:.1%} of the lines of source {source!r} "
            f"({removed:,} of {lines:,} non-blank lines; profile {profiles}): "
            + ", ".join(f"{rule} {n / lines:.1%} ({n:,})" for rule, n in rules))
    return warnings


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def describe(result: StageResult) -> tuple[str, list[str]]:
    """The log line and report lines of a clean result (non-zero counts only)."""
    c, info = result.counts, result.info
    kept_rate = c["kept"] / c["docs_in"] if c["docs_in"] else 0.0
    rejected = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:") and v}
    warnings = info.get("warnings", [])
    line = (f"clean: {c['docs_in']} docs in, {c['kept']} kept, rejected {rejected}, "
            f"{info.get('repaired', 0)} repaired -> {result.path}"
            + (f" ({len(warnings)} warning(s): see below)" if warnings else ""))
    rows = [f"| {k} | {v:,} |" for k, v in rejected.items()]
    return line, [
        *(f"- **{w}**" for w in warnings),
        f"- kept: {kept_rate:.1%} of documents",
        f"- repaired by ftfy or normalization: {info.get('repaired', 0)}; Python files left as "
        f"they were to keep their AST: {info.get('ast_reverted', 0)}",
        f"- lines removed by the C4 line rules (prose): {_nonzero(info.get('lines_removed', {}))}",
        *(f"- source {src!r}: {acc['lines']:,} non-blank lines, removed {_nonzero(acc['removed'])}"
          for src, acc in info.get("lines_by_source", {}).items()),
        f"- documents per profile: {info.get('profiles', {})}",
        f"- shards cleaned: {info.get('shards_run', 0)}, reused: {info.get('shards_reused', 0)}",
        f"- time per sub-step: {info.get('timings', {})}",
        f"- rejection ledger: `{Path(result.path) / 'rejected'}`",
        "", "| rejected because | documents |", "|---|---|", *(rows or ["| (none) | 0 |"])]
