"""The tokenizer: a GPT-2 style byte-level BPE, trained on a text sample or loaded from files.

A `tokenizer_source` is a `tokenizer.json`, or GPT-2 `vocab.json` + `merges.txt`, from a path or URL
(`fetch_tokenizer_source`; a URL is fetched once per process). `load_tokenizer` reads the stage's
saved tokenizer back so that special-token text in documents stays text; `encode_docs` turns a batch
of documents into one eos-separated id stream. Used by the tokenize stage, evaluation and
registration; no Prefect here.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import base64
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Iterable, Iterator

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.core.urls import redact, with_query

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


_FETCHED: dict[tuple, dict[str, bytes]] = {}
"""URL sources fetched by this process (plan() runs more than once per stage); paths are reread."""


def _read_location(location: str, query: str | None = None, auth: str | None = None) -> bytes:
    if location.startswith(("http://", "https://")):
        request = urllib.request.Request(with_query(location, query) if query else location)
        if auth is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (user's config)
                return response.read()
        except OSError as exc:  # the message names the URL as shown, never its secrets
            raise OSError(f"tokenizer_source {redact(location)}: {redact(str(exc))}") from None
    return Path(location).expanduser().read_bytes()


def fetch_tokenizer_source(source: str, query: str | None = None, auth: str | None = None) -> dict[str, bytes]:
    """{file name: bytes}: `tokenizer.json`, or GPT-2 `vocab.json` + `merges.txt`, from a path or URL
    (`query`, `auth`: the secrets taken out of the URL, `TokenizerConfig.source_secrets`; the query
    goes with every file fetched)."""
    is_url = source.startswith(("http://", "https://"))
    key = (source, query, auth)
    if is_url and key in _FETCHED:
        return _FETCHED[key]
    path = urlsplit(source).path if is_url else source
    if is_url and query is None:  # a query without secrets (`?download=1`) goes with every file too
        query = urlsplit(source).query or None
    read = (lambda loc: _read_location(loc, query, auth))
    if path.endswith(".json") and not path.endswith("vocab.json"):
        files = {TOKENIZER_FILE: read(source)}
    else:
        base = urlunsplit(urlsplit(source)._replace(query="")) if is_url else str(Path(source).expanduser())
        if base.endswith("vocab.json"):  # the vocab file itself: merges.txt sits beside it
            base = base[: -len("vocab.json")]
        join = (lambda n: base + n) if is_url else (lambda n: str(Path(base) / n))
        if not is_url and (Path(base) / TOKENIZER_FILE).is_file():
            files = {TOKENIZER_FILE: read(join(TOKENIZER_FILE))}
        else:
            files = {"vocab.json": read(join("vocab.json")), "merges.txt": read(join("merges.txt"))}
    if is_url:
        _FETCHED[key] = files
    return files


def source_sha256(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def tokenizer_from_files(files: dict[str, bytes], eos: str = EOS) -> Tokenizer:
    """A Tokenizer from fetched files; GPT-2 vocab/merges become a byte-level BPE with `eos` special."""
    if TOKENIZER_FILE in files:
        tokenizer = Tokenizer.from_str(files[TOKENIZER_FILE].decode("utf-8"))
    else:
        vocab = json.loads(files["vocab.json"].decode("utf-8"))
        merges = [tuple(line.split(" ")) for line in files["merges.txt"].decode("utf-8").splitlines()
                  if line and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ValueError("merges.txt: every line must hold two space-separated tokens")
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
    if tokenizer.token_to_id(eos) is None:
        raise ValueError(f"tokenizer.eos_token {eos!r} is not in the loaded tokenizer's vocabulary")
    tokenizer.add_special_tokens([AddedToken(eos, special=True)])  # keeps its id when in the vocab
    return tokenizer


@contextlib.contextmanager
def parallelism() -> Iterator[None]:
    """Let tokenizers use every core for training and encode_batch, unless the user chose already.

    Merges and ids do not depend on the thread count (the BPE trainer breaks count ties by pair id;
    tests compare tokenizer.json across both settings), so this is only about speed: 1.87 vs 3.32 MB/s
    on two cores (REFERENCE.md section 5). The variable is set for the stage's duration only: left set,
    it counts as "configured" and tokenizers would no longer turn parallelism off in processes forked
    later, which can deadlock them.
    """
    if os.environ.get(PARALLELISM_ENV) is not None:
        yield
        return
    os.environ[PARALLELISM_ENV] = "true"
    try:
        yield
    finally:
        os.environ.pop(PARALLELISM_ENV, None)


def train_tokenizer(texts: Iterable[str], vocab_size: int, eos: str = EOS) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on `texts`; `eos` is id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _text_only(tokenizer: Tokenizer) -> Tokenizer:
    # A literal "<|endoftext|>" inside a document is text: encode it as bytes, not as the eos id, or
    # the document would not round-trip and its bytes would vanish from n_bytes.
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(tokens_dir: str | Path) -> Tokenizer:
    """The stage's tokenizer; special-token text in the input is encoded as plain text."""
    return _text_only(Tokenizer.from_file(str(Path(tokens_dir) / TOKENIZER_FILE)))


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to, shape [vocab]; special tokens count 0.

    In a byte-level vocabulary every character of a token string stands for exactly one byte."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if not alphabet.issuperset(token):
            raise ValueError(f"token {i} ({token!r}) is not in the byte-level alphabet")
        lengths[i] = len(token)
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def encode_docs(tokenizer: Tokenizer, texts: list[str], eos_id: int,
                dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the ids of each text followed by eos, concatenated; tokens per document including its eos)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    stream = np.fromiter(itertools.chain.from_iterable(x for doc in ids for x in (doc, (eos_id,))),
                         dtype=dtype, count=int(lengths.sum()))
    return stream, lengths
