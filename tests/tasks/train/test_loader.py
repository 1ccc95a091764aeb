"""Token loader: batches match the stored rows, per-epoch coverage across ranks, exact resume (also
onto another world size), drop_last, state validation and token-budget arithmetic."""
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.core.data_config import TokenizerConfig
from tasks.train.loader import (TokenLoader, steps_for_tokens, steps_per_epoch, tokens_for_steps,
                          tokens_per_step, training_steps)
from tasks.core.protocol import StageResult
from tasks.tokenize.rows import read_rows
from tasks.tokenize.stage import run_tokenize

SEQ = 8


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    (root / "dedup").mkdir()
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    for k in range(3):
        ids = [f"d{k}-{i}" for i in range(40)]
        texts = [" ".join(words[(i * 5 + j + k) % len(words)] for j in range(6 + i % 7)) + f" #{i}"
                 for i in range(40)]
        pq.write_table(pa.table({"id": ids, "text": texts, "source": ["s"] * 40}),
                       root / "dedup" / f"docs-{k:05d}.parquet")
    up = StageResult(stage="dedup", fingerprint="fp", path=str(root / "dedup"))
    cfg = TokenizerConfig(vocab_size=300, seq_len=SEQ, val_fraction=0.2, rows_per_file=13)
    result = run_tokenize(cfg, up, str(root / "ws"))
    return result.path


def rows_of(tokens_dir):
    return read_rows(tokens_dir, "train")[0].astype(np.int64)


def owner(array):
    while isinstance(array, np.ndarray):
        array = array.base
    return array


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_batches_are_the_stored_rows_shifted(tokens_dir):
    rows = rows_of(tokens_dir)
    loader = TokenLoader(tokens_dir, "train", batch_size=5, seed=3)
    assert len(loader.chunks) > 3 and loader.num_rows == len(rows)  # several files: multi-chunk gather
    assert all(isinstance(owner(c), pa.Buffer) for c in loader.chunks)  # views of Arrow buffers
    order = loader.order(0)
    for step, (x, y) in enumerate(loader):
        idx = order[step * 5:(step + 1) * 5]
        assert x.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
        assert x.tolist() == rows[idx, :-1].tolist() and y.tolist() == rows[idx, 1:].tolist()
    assert step + 1 == len(loader) == -(-len(rows) // 5)
    assert x.shape == (len(rows) - 5 * step, SEQ)  # the short last batch keeps the remainder
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_order_depends_on_seed_and_epoch_only(tokens_dir):
    a, b = TokenLoader(tokens_dir, "train", 4, seed=1), TokenLoader(tokens_dir, "train", 4, seed=1)
    assert a.order(0).tolist() == b.order(0).tolist()
    assert a.order(0).tolist() != a.order(1).tolist()
    assert a.order(0).tolist() != TokenLoader(tokens_dir, "train", 4, seed=2).order(0).tolist()
    assert sorted(a.order(5).tolist()) == list(range(a.num_rows))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_every_row_once_per_epoch(tokens_dir, world_size):
    rows = rows_of(tokens_dir)
    loaders = [TokenLoader(tokens_dir, "train", 4, seed=0, rank=r, world_size=world_size)
               for r in range(world_size)]
    for epoch in range(2):
        seen = []
        per_rank = [list(loader.iter_indices()) for loader in loaders]
        assert len({len(p) for p in per_rank}) == 1  # every rank takes part in every step
        for step in zip(*per_rank):
            sizes = [len(s) for s in step]
            assert max(sizes) - min(sizes) <= 1
            seen += [int(i) for s in step for i in s]
        assert sorted(seen) == list(range(len(rows)))  # disjoint and complete
        assert all(loader.state_dict()["epoch"] == epoch + 1 for loader in loaders)
    x, y = next(iter(loaders[-1]))
    assert x.shape == (4, SEQ)


def test_resume_yields_exactly_the_uninterrupted_batches(tokens_dir):
    uninterrupted = take(TokenLoader(tokens_dir, "train", 6, seed=9).stream(), 40)  # > 2 epochs
    per_epoch = len(TokenLoader(tokens_dir, "train", 6, seed=9))
    for cut in (1, 7, per_epoch - 1, per_epoch, per_epoch + 3):
        first = TokenLoader(tokens_dir, "train", 6, seed=9)
        head = take(first.stream(), cut)
        state = first.state_dict()
        resumed = TokenLoader(tokens_dir, "train", 6, seed=9)
        resumed.load_state_dict(state)
        tail = take(resumed.stream(), 40 - cut)
        for (x, y), (ux, uy) in zip(head + tail, uninterrupted):
            assert torch.equal(x, ux) and torch.equal(y, uy)


def test_resume_from_two_ranks_onto_three_continues_the_epoch(tokens_dir):
    n = TokenLoader(tokens_dir, "train", 3).num_rows
    two = [TokenLoader(tokens_dir, "train", 3, seed=4, rank=r, world_size=2) for r in range(2)]
    iters = [loader.iter_indices() for loader in two]
    seen = []
    for _ in range(5):
        seen += [int(i) for it in iters for i in next(it)]
    states = [loader.state_dict() for loader in two]
    assert states[0] == states[1] and states[0]["position"] == 5 * 2 * 3
    three = [TokenLoader(tokens_dir, "train", 3, seed=4, rank=r, world_size=3) for r in range(3)]
    for loader in three:
        loader.load_state_dict(states[0])
    seen += [int(i) for loader in three for s in loader.iter_indices() for i in s]
    assert sorted(seen) == list(range(n))  # nothing repeated, nothing skipped
    assert [loader.state_dict()["epoch"] for loader in three] == [1, 1, 1]
    nxt = [int(i) for loader in three for s in loader.iter_indices() for i in s]
    assert sorted(nxt) == list(range(n))  # and the next epoch is whole again
    # the rows the 3-rank resume read are the rows of the uninterrupted global order
    assert sorted(seen[30:]) == sorted(TokenLoader(tokens_dir, "train", 3, seed=4).order(0)[30:].tolist())


def test_drop_last_skips_the_short_step(tokens_dir):
    loader = TokenLoader(tokens_dir, "train", 7, seed=0, rank=1, world_size=2, drop_last=True)
    steps = list(loader.iter_indices())
    assert len(steps) == len(loader) == loader.num_rows // 14 and all(len(s) == 7 for s in steps)
    assert loader.state_dict()["epoch"] == 1


def test_excluded_rows_are_never_served(tokens_dir):
    n = TokenLoader(tokens_dir, "train", 4).num_rows
    gone = np.array([0, 5, n - 1])
    loaders = [TokenLoader(tokens_dir, "train", 4, rank=r, world_size=2, exclude_rows=gone) for r in range(2)]
    seen = sorted(int(i) for loader in loaders for s in loader.iter_indices() for i in s)
    assert seen == sorted(set(range(n)) - set(gone.tolist()))
    state = loaders[0].state_dict()
    with pytest.raises(ValueError):  # another row set: the saved order would not continue
        TokenLoader(tokens_dir, "train", 4).load_state_dict(state)


def test_state_from_another_dataset_is_refused(tokens_dir):
    loader = TokenLoader(tokens_dir, "train", 4, seed=0)
    state = loader.state_dict()
    for key, value in (("seed", 1), ("num_rows", 3), ("split", "val"), ("version", 0)):
        with pytest.raises(ValueError):
            TokenLoader(tokens_dir, "train", 4, seed=0).load_state_dict({**state, key: value})
    with pytest.raises(ValueError):
        TokenLoader(tokens_dir, "train", 4, rank=2, world_size=2)
    val = TokenLoader(tokens_dir, "val", 2)
    assert val.num_rows == read_rows(tokens_dir, "val")[0].shape[0]


def test_token_budget_maps_to_steps():
    assert tokens_per_step(8, 256, world_size=4) == 8192
    assert steps_for_tokens(8192 * 10, 8, 256, 4) == 10 and steps_for_tokens(8192 * 10 + 1, 8, 256, 4) == 11
    assert tokens_for_steps(10, 8, 256, 4) == 81920
    assert training_steps(tokens=300_000_000_000, batch_size=256, seq_len=2048) == 572_205
    assert training_steps(steps=5, batch_size=1, seq_len=8) == 5
    with pytest.raises(ValueError):
        training_steps(steps=5, tokens=10, batch_size=1, seq_len=8)
    with pytest.raises(ValueError):
        training_steps(batch_size=1, seq_len=8)
    assert steps_per_epoch(10, 3) == 4 and steps_per_epoch(10, 3, drop_last=True) == 3
    assert steps_per_epoch(10, 2, world_size=2) == 3
