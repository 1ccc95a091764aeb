"""Config sections of the data stages: corpus (download), clean, dedup, tokenizer.

Every field has a docstring (shown in the Prefect run form); `tasks/core/config.py` composes the
sections into PipelineConfig and loads presets."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from tasks.core.section import Section
from tasks.core.urls import has_secrets, split_secrets, userinfo_auth, with_query


def secrets_out(data: Any, url_key: str, auth_key: str, query_key: str) -> Any:
    """A section's raw input with the URL under `url_key` split by the one parser
    (tasks/core/urls.py): the URL as it may be shown stays there, its userinfo (percent-decoded) goes to
    `auth_key` and a query string holding secrets to `query_key`, unless those were given."""
    if isinstance(data, dict) and isinstance(data.get(url_key), str):
        shown, userinfo, query = split_secrets(data[url_key])
        if userinfo is not None or query is not None:
            data = {**data, url_key: shown}
            if userinfo is not None and data.get(auth_key) is None:
                data[auth_key] = userinfo_auth(userinfo)
            if query is not None and data.get(query_key) is None:
                data[query_key] = query
    return data


class SourceSpec(Section):
    """One corpus source with what is known about it (as the Pile's checksum list gives)."""

    url: str = Field(min_length=1)
    """Local path, directory or glob, `python-stdlib`, or `https://`, `s3://`, `hf://` URL (an s3/hf
    directory or glob is listed). Userinfo (`user:pass@`, percent-encoded) is moved into `auth`, and
    a query string holding secrets (`token=`, `sig=`, `X-Amz-Signature=`, ...) into `query`; the
    URL keeps the rest, with those values shown as `***`, and is all that is ever recorded."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Expected sha256 of the file (lowercase hex); the download is verified against it."""
    size: int | None = Field(default=None, ge=0)
    """Expected size in bytes; verified too."""
    format: Literal["auto", "jsonl", "jsonl.zst", "json.gz", "parquet", "txt"] = "auto"
    """File format; `auto` goes by the file name."""
    text_field: str | None = None
    """Field/column holding the text (None = the corpus-wide `text_field`)."""
    id_field: str | None = "id"
    """Field used as the document id (missing or None: `<source>:<file>:<line>`)."""
    meta_fields: list[str] | None = None
    """Fields kept in `meta` (None = every field except text and id; Pile: its `meta` object is kept)."""
    separator: str | None = None
    """For text files: split into one document per separator occurrence, each document ending with
    its separator, so the documents concatenated give back the file (None = no separator split; see
    `doc_bytes`). Pieces holding only whitespace join the document before them."""
    keep_separator: bool = True
    """False: the separator is a pure delimiter (e.g. `<|endoftext|>`) and is left out of the text."""
    doc_bytes: int | None = Field(default=8192, ge=256)
    """Plain-text files (`.txt`, or `format: txt`) larger than this, with no `separator`, are split
    into documents of about this many bytes: each ends at the first blank-line paragraph boundary
    after this many bytes, the paragraph is cut at a line boundary only when it alone exceeds
    4 x `doc_bytes`, and a last piece under half of it joins the document before it. Ids are
    `<source>:<file>:1`, `:2`, ...; the documents concatenated give back the file. Smaller files and
    code stay one document. None = one document per file."""
    weight: float = Field(default=1.0, gt=0)
    """Sampling weight of this source, recorded in the manifest for the stages after download."""
    auth: SecretStr | None = None
    """HTTP basic credentials `user:password` for this source (taken out of the URL when given there,
    percent-decoded: `user:p%40ss@host` -> `user:p@ss`; the URL's last `@` ends them)."""
    query: SecretStr | None = None
    """The URL's whole query string when it holds secrets (a signed S3/HTTP URL): taken out of `url`
    and sent with the request only."""

    @model_validator(mode="before")
    @classmethod
    def _secrets_out_of_url(cls, data: Any) -> Any:
        return secrets_out(data, "url", "auth", "query")

    def request_url(self, url: str | None = None) -> str:
        """`url` (default: this source's own) as requested: with the secret query string put back."""
        url = url or self.url
        if self.query is None or url != self.url:
            return url
        return with_query(url, self.query.get_secret_value())


class CorpusConfig(Section):
    sources: list[str | SourceSpec] = Field(default_factory=lambda: ["python-stdlib"], min_length=1)
    """Where the documents come from: directories, files or globs of .txt/.py/.md/.jsonl/.jsonl.zst/
    .json.gz/.parquet, `python-stdlib` (the running interpreter's standard library sources), or
    https/s3/hf URLs; an entry may be a mapping (see SourceSpec) with sha256, size, format, fields."""
    max_bytes: int | None = Field(default=8_000_000, gt=0)
    """Stop taking source files once this many bytes were read (None = no cap)."""
    shard_bytes: int = Field(default=16_000_000, gt=0)
    """Target uncompressed size of one raw jsonl.zst shard."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.json.gz/.parquet sources."""
    parallel_downloads: int = Field(default=4, ge=1, le=64)
    """At most this many remote files are transferred at once."""
    download_retries: int = Field(default=5, ge=0, le=50)
    """Retries of one transfer on transient errors (timeouts, dropped connections, 429, 5xx)."""
    retry_backoff_s: float = Field(default=1.0, ge=0)
    """First retry waits about this long, doubling each time (+/- 50% jitter, capped at 60 s); a 429
    or 503 answer with `Retry-After` waits what the server asks instead (also capped at 60 s)."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Connect/read timeout of one HTTP request."""
    max_bad_fraction: float = Field(default=0.1, ge=0, le=1)
    """The stage fails (with the counts) when quarantined / records read exceeds this."""
    s3_endpoint: str | None = None
    """Endpoint URL for S3-compatible stores (MinIO, R2, ...); None = AWS."""
    s3_access_key: SecretStr | None = None
    """S3 access key id (None = the usual AWS credential chain)."""
    s3_secret_key: SecretStr | None = None
    """S3 secret access key."""
    hf_token: SecretStr | None = None
    """Hugging Face token for gated or private datasets (None = huggingface_hub's own login)."""

    @model_validator(mode="before")
    @classmethod
    def _userinfo_sources(cls, data: Any) -> Any:
        # A plain string with credentials or a secret query in it becomes a SourceSpec, so that the
        # secret lands in a SecretStr (masked in MLflow params and Prefect's flow-run parameters).
        if isinstance(data, dict) and isinstance(data.get("sources"), list):
            data = {**data, "sources": [{"url": s} if isinstance(s, str) and has_secrets(s) else s
                                        for s in data["sources"]]}
        return data


class ProseFilters(Section):
    """Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A,
    table A1) and C4 line rules (Raffel et al. 2020, section 2.2) for natural-language text."""

    min_words: int = Field(default=50, ge=0)
    """Gopher: fewer words than this -> `gopher_word_count`."""
    max_words: int = Field(default=100_000, gt=0)
    """Gopher: more words than this -> `gopher_word_count`."""
    min_mean_word_length: float = Field(default=3.0, ge=0)
    """Gopher: mean word length (characters) below this -> `gopher_mean_word_length`."""
    max_mean_word_length: float = Field(default=10.0, gt=0)
    """Gopher: mean word length above this -> `gopher_mean_word_length`."""
    max_symbol_word_ratio: float = Field(default=0.1, ge=0)
    """Gopher: ('#' + '...' + '\u2026') per word above this -> `gopher_symbol_ratio`."""
    max_bullet_lines: float = Field(default=0.9, ge=0, le=1)
    """Gopher: fraction of lines starting with a bullet above this -> `gopher_bullet_lines`."""
    max_ellipsis_lines: float = Field(default=0.3, ge=0, le=1)
    """Gopher: fraction of lines ending with an ellipsis above this -> `gopher_ellipsis_lines`."""
    min_alpha_words: float = Field(default=0.8, ge=0, le=1)
    """Gopher: fraction of words with an alphabetic character below this -> `gopher_alpha_words`."""
    min_stop_words: int = Field(default=2, ge=0)
    """Gopher: fewer of the stop words (the, be, to, of, and, that, have, with) -> `gopher_stop_words`."""
    max_dup_line_fraction: float = Field(default=0.30, ge=0, le=1)
    """Gopher table A1: fraction of lines that duplicate an earlier line -> `gopher_dup_lines`."""
    max_dup_para_fraction: float = Field(default=0.30, ge=0, le=1)
    """Gopher table A1: fraction of paragraphs duplicating an earlier one -> `gopher_dup_paragraphs`."""
    max_dup_line_chars: float = Field(default=0.20, ge=0, le=1)
    """Gopher table A1: fraction of characters in duplicated lines -> `gopher_dup_line_chars`."""
    max_dup_para_chars: float = Field(default=0.20, ge=0, le=1)
    """Gopher table A1: fraction of characters in duplicated paragraphs -> `gopher_dup_para_chars`."""
    top_ngram_max: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    """Gopher table A1: n -> max fraction of characters in the most frequent word n-gram
    (`gopher_top_ngram`)."""
    dup_ngram_max: dict[int, float] = Field(default_factory=lambda: {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """Gopher table A1: n -> max fraction of characters in duplicated word n-grams
    (`gopher_dup_ngram`)."""
    c4_lorem_ipsum: bool = True
    """C4: reject documents containing "lorem ipsum" (`c4_lorem_ipsum`)."""
    c4_curly_bracket: bool = False
    """C4 rejects any page with a '{' (`c4_curly_bracket`); off by default: it drops prose about code."""
    c4_drop_noise_lines: bool = True
    """C4: remove lines mentioning javascript or cookie/terms-of-use boilerplate (lines, not documents)."""
    c4_terminal_punct: bool = True
    """C4 (Raffel et al. 2020, section 2.2): keep only text ending in a terminal punctuation mark
    (`c4_end_marks`), judged per `c4_unit`. FineWeb left this rule out: it removes much web text."""
    c4_unit: Literal["paragraph", "line"] = "paragraph"
    """What the terminal-punctuation and words-per-line rules judge. `line`: C4 exactly, each line
    on its own (it removes verse, dialogue, headings and hard-wrapped prose: 72% of
    tinyshakespeare's lines). `paragraph` (a run of non-blank lines): the lines up to a
    paragraph's last line ending in a terminal mark are kept and the lines after it removed
    (`c4_no_terminal_punct`); a one-line paragraph with fewer than `c4_min_words_per_line` words is
    removed (`c4_short_line`); a line of at most `c4_heading_words` words left over by the first
    rule (a paragraph of its own, or a paragraph's last line) is kept as a heading when kept text
    follows it (at most two headings in a row)."""
    c4_heading_words: int = Field(default=12, ge=0)
    """Longest heading, in words, that the `paragraph` unit keeps before kept text (0 = none)."""
    c4_end_marks: list[str] = Field(default_factory=lambda: [".", "!", "?", '"', "\u201d"])
    """C4 section 2.2: period, exclamation mark, question mark, end quotation mark (ASCII or curly)."""
    c4_min_words_per_line: int = Field(default=3, ge=0)
    """C4 section 2.2 (as datatrove's C4QualityFilter applies it): lines with fewer words are removed."""
    c4_min_sentences: int = Field(default=5, ge=0)
    """C4 section 2.2: a page with fewer sentences (after the line rules) -> `c4_sentences`."""
    c4_min_lines: int = Field(default=1, ge=0)
    """A document the C4 line rules leave with fewer non-blank lines -> `c4_lines_left` (checked
    before the other rules see what is left, so it is not booked as `empty`)."""


class CodeFilters(Section):
    """Source-code rules from Codex (Chen et al. 2021, section 3) and StarCoder (Li et al. 2023,
    section 3 / BigCode preprocessing): they keep code that prose rules would drop."""

    max_line_length: int = Field(default=1000, gt=0)
    """StarCoder: a line longer than this -> `code_max_line_length`."""
    max_mean_line_length: float = Field(default=100.0, gt=0)
    """Codex/StarCoder: mean line length above this -> `code_mean_line_length`."""
    min_alnum_fraction: float = Field(default=0.25, ge=0, le=1)
    """Codex/StarCoder: fraction of alphanumeric characters below this -> `code_alnum_fraction`."""
    autogenerated_markers: list[str] = Field(default_factory=lambda: [
        "auto-generated", "autogenerated", "automatically generated", "generated by",
        "do not edit"])
    """StarCoder: any of these (case-insensitive) in the first lines -> `code_autogenerated`."""
    autogenerated_lines: int = Field(default=5, ge=0)
    """StarCoder: how many leading lines are searched for the markers."""


CODE_SUFFIX_PATTERNS = ["*.py", "*.pyi", "*.c", "*.h", "*.cpp", "*.hpp", "*.js", "*.ts", "*.java",
                        "*.go", "*.rs", "*.sh"]


class CleanConfig(Section):
    min_chars: int = Field(default=64, ge=0)
    """Documents shorter than this (after repair) are rejected as `too_short`."""
    max_chars: int = Field(default=1_000_000, gt=0)
    """Documents longer than this are rejected as `too_long`."""
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalization form. NFC only merges canonically equivalent sequences (it does fold a
    few compatibility characters such as the Kelvin sign into letters); NFKC folds much more."""
    profiles: dict[str, Literal["prose", "code", "none"]] = Field(
        default_factory=lambda: {**{p: "code" for p in CODE_SUFFIX_PATTERNS},
                                 "*.txt": "prose", "*.md": "prose", "*.rst": "prose"})
    """Document id glob -> filter profile; the first match in order wins. Ids are
    `<source>:<relative path>[:<n>]` (n: jsonl line or part of a split text file, ignored when
    matching), so suffix globs pick by file type."""
    default_profile: Literal["prose", "code", "none"] = "prose"
    """Profile for documents nothing else picks a profile for (`none` = length rules only)."""
    source_profiles: dict[str, Literal["prose", "code", "none"]] = Field(default_factory=dict)
    """Source label glob -> profile, checked before `profiles` (labels: the source's base name)."""
    profile_field: str | None = None
    """A `meta` field whose value (`prose`, `code`, `none`) picks a document's profile, checked first."""
    detect_code: bool = True
    """Documents no field, source or id glob picks get `code` when most of their lines read as code."""
    prose: dict[str, Any] = Field(default_factory=lambda: ProseFilters().model_dump())
    """Thresholds of the `prose` profile: the fields of `ProseFilters` (partial dicts allowed; kept as
    a plain mapping so it shows as one parameter in MLflow)."""
    code: dict[str, Any] = Field(default_factory=lambda: CodeFilters().model_dump())
    """Thresholds of the `code` profile: the fields of `CodeFilters`."""
    workers: int | None = Field(default=None, gt=0)
    """Processes cleaning shards in parallel (None = CPU count). Not part of the fingerprint: the
    output is the same for any worker count."""

    @field_validator("prose")
    @classmethod
    def _prose(cls, value: dict[str, Any]) -> dict[str, Any]:
        return ProseFilters(**value).model_dump()

    @field_validator("code")
    @classmethod
    def _code(cls, value: dict[str, Any]) -> dict[str, Any]:
        return CodeFilters(**value).model_dump()

    @property
    def prose_rules(self) -> ProseFilters:
        return ProseFilters(**self.prose)

    @property
    def code_rules(self) -> CodeFilters:
        return CodeFilters(**self.code)

    @model_validator(mode="after")
    def _bounds(self) -> CleanConfig:
        if self.max_chars <= self.min_chars:
            raise ValueError("max_chars must be greater than min_chars")
        if self.prose["max_words"] <= self.prose["min_words"]:
            raise ValueError("prose.max_words must be greater than prose.min_words")
        return self


class DedupConfig(Section):
    normalize_whitespace: bool = True
    """Collapse runs of whitespace before hashing, so re-indented copies count as duplicates."""
    lowercase: bool = False
    """Lowercase before hashing (off: case matters in code)."""
    near: bool = True
    """Also remove near duplicates (MinHash + LSH over word n-grams)."""
    ngram: int = Field(default=5, ge=1)
    """Words per shingle (FineWeb/datatrove: 5). Documents with fewer words skip near dedup."""
    bands: int = Field(default=32, gt=0)
    """LSH bands. A pair at true Jaccard J becomes a candidate with probability
    1 - (1 - J**rows)**bands: more bands find more (and cost more band records and candidate
    checks per document), more rows per band find fewer, dissimilar pairs above all. The default
    32 x 8 = 256 MinHash values was chosen from the measured curve in benchmarks/RESULTS.md ("Dedup
    defaults"): on a mixed code + prose + verse corpus it removes >= 0.99 of planted copies at true
    word-5-gram Jaccard >= 0.75 and no document below 0.7. FineWeb's 14 x 8 = 112 found 0.94-0.97 at
    its best threshold there (REFERENCE.md section 5)."""
    rows: int = Field(default=8, gt=0)
    """MinHash values per band (see `bands`)."""
    threshold: float = Field(default=0.7, gt=0, le=1)
    """Verification: candidate pairs whose estimated Jaccard (share of equal MinHash values over
    all bands x rows) is below this are not merged. Lower removes more near copies and more
    merely-related documents (on the stdlib: the `encodings/` tables at J 0.55-0.70); higher keeps
    both. With 256 values the estimate's spread at J 0.75 is about +-0.03, so 0.7 keeps ~99% of
    copies at J 0.75-0.8."""
    verify: bool = True
    """Check the Jaccard estimate of every LSH candidate pair before merging (off: any shared band
    merges, as datatrove does)."""
    seed: int = 1
    """Seed of the MinHash hash functions."""
    method: Literal["oph", "permutations"] = "oph"
    """MinHash variant: `oph` = one permutation hashing with optimal densification (Li et al. 2012,
    Shrivastava 2017; one hash per shingle), `permutations` = bands*rows independent hash functions
    (as datasketch; ~100x the hashing work)."""
    workers: int | None = Field(default=None, gt=0)
    """Processes computing signatures and writing shards (None = CPU count). Not fingerprinted."""


class TokenizerConfig(Section):
    vocab_size: int = Field(default=4096, ge=260, le=65536)
    """Size of the trained byte-level BPE vocabulary (256 bytes + merges + `<|endoftext|>`)."""
    seq_len: int = Field(default=256, ge=8)
    """Context length of a packed training row (rows hold seq_len + 1 tokens: inputs and targets)."""
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    """Share of documents (chosen by a hash of the document id) held out for validation."""
    train_sample_bytes: int = Field(default=50_000_000, gt=0)
    """At most this many bytes of text are used to train the BPE merges."""
    rows_per_file: int = Field(default=8192, gt=0)
    """Packed rows per Parquet file."""
    row_group_tokens: int = Field(default=2_000_000, ge=1024)
    """Target tokens per Parquet row group (rows per group = this // (seq_len + 1), at least 1)."""
    tokenizer_source: str | None = None
    """Use an existing tokenizer instead of training one: a `tokenizer.json` path or http(s) URL, or a
    directory or URL prefix (ending in `/`) holding GPT-2 `vocab.json` + `merges.txt`. Its sha256 is
    part of the stage fingerprint (`vocab_size`, `train_sample_bytes` then go unused). None = train a
    byte-level BPE on the train split. A URL's userinfo and secret query values are taken out as
    for corpus sources (into `tokenizer_source_auth` / `tokenizer_source_query`), so a signed URL is
    recorded with `***` in place of its signature."""
    tokenizer_source_auth: SecretStr | None = None
    """HTTP basic credentials `user:password` for `tokenizer_source` (taken out of its URL)."""
    tokenizer_source_query: SecretStr | None = None
    """The query string of a `tokenizer_source` URL that holds secrets: sent with the request only."""
    eos_token: str = "<|endoftext|>"
    """Document separator; must be in the vocabulary of a loaded tokenizer."""
    split_seed: int = 0
    """Seed mixed into the per-document hash that picks the train/val split."""
    mixture_seed: int = 0
    """Seed of the per-document draws of fractional mixture weights."""
    mixture: dict[str, float] = Field(default_factory=dict)
    """Weight in epochs per source label (the `source` column: a local source's base name, or a
    remote source's URL; e.g. 3.0 = every document three times, 0.5 = half of them, drawn by a hash
    of the id and `mixture_seed`); unlisted sources 1.0.
    Applies to the train split only."""

    @model_validator(mode="before")
    @classmethod
    def _secrets_out_of_source(cls, data: Any) -> Any:
        return secrets_out(data, "tokenizer_source", "tokenizer_source_auth", "tokenizer_source_query")

    def source_secrets(self) -> tuple[str | None, str | None]:
        """(query, basic auth) to send with `tokenizer_source`'s requests, or None each."""
        return tuple(s.get_secret_value() if s is not None else None  # type: ignore[return-value]
                     for s in (self.tokenizer_source_query, self.tokenizer_source_auth))

    @model_validator(mode="after")
    def _mixture_weights(self) -> TokenizerConfig:
        for label, weight in self.mixture.items():
            if not label or not (0.0 <= weight <= 100.0):
                raise ValueError(f"mixture[{label!r}] = {weight}: labels must be non-empty and "
                                 f"weights within [0, 100] epochs")
        return self
