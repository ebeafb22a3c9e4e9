"""Training data: the synthetic task puts its answers on another SP rank, documents are packed with
exact boundaries and labels, samples depend on their global index only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpar import config as cfg
from seqpar.sp.layout import owners_and_slots, num_shards
from seqpar.train import data as D


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 3, 4])
def test_mqar_answers_sit_on_another_rank(layout, P):
    T, n = 96 * P, 4
    task = D.MQAR(T, 256, n, seed=3)
    owners, _ = owners_and_slots(layout, P)
    L = T // num_shards(layout, P)
    owner = lambda pos: owners[pos // L]  # noqa: E731
    for index in range(5):
        tokens, labels, _ = task(index)
        pairs = {int(tokens[i]): int(tokens[i + 1]) for i in range(0, 2 * n, 2)}
        assert {owner(i) for i in range(2 * n)} == {0}
        targets = (labels != D.IGNORE).nonzero().squeeze(1)
        assert len(targets) == T // 8
        for t in targets.tolist():
            assert owner(t) != 0, "the question must be on a rank without the pairs"
            assert int(labels[t]) == pairs[int(tokens[t])] == int(tokens[t + 1])
        first = [int(tokens[t]) for t in targets[:n]]
        assert sorted(first) == sorted(pairs), "the first n queries ask every key once"
    assert torch.equal(task(2)[0], D.MQAR(T, 256, n, seed=3)(2)[0])


def test_passkey():
    tokens, labels, _ = D.Passkey(256, 64, seed=1)(0)
    where = int((tokens == 0).nonzero()[0])
    key = tokens[where + 1:where + 1 + D.Passkey.DIGITS]
    assert torch.equal(labels[labels != D.IGNORE], key) and where < 64


def _docs(tmp_path):
    texts = ["alpha beta gamma\n", "x", "the third document is the longest of them all " * 3, "ok\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    return texts


def test_text_packing_keeps_documents_apart(tmp_path):
    texts = _docs(tmp_path)
    docs = D.text_documents(str(tmp_path))
    assert [bytes(d[:-1].astype(np.uint8)).decode() for d in docs] == texts and all(d[-1] == D.EOS for d in docs)
    stream = np.concatenate(docs)
    doc_id = np.concatenate([[i] * len(d) for i, d in enumerate(docs)])
    T = 16
    source = D.DocumentStream(docs, T, pack=True, seed=0)
    seen = set()
    for index in range(source.num_sequences):
        tokens, labels, lens = source(index)
        start = next(s for s in range(0, len(stream) - T) if np.array_equal(stream[s:s + T], tokens.numpy())
                     and s % T == 0)
        seen.add(start)
        assert sum(lens) == T
        bounds = np.cumsum([0] + lens)
        for a, b in zip(bounds, bounds[1:]):  # each piece is one document
            assert len(set(doc_id[start + a:start + b])) == 1
        for t in range(T):
            same_doc = doc_id[start + t] == doc_id[start + t + 1]
            assert int(labels[t]) == (int(stream[start + t + 1]) if same_doc else D.IGNORE)
    assert len(seen) == source.num_sequences  # a permutation: every sequence once per pass
    batch = D.collate([source(0), source(1)], pack=True)
    assert batch.tokens.shape == (1, 2 * T) and batch.cu_seqlens[-1] == 2 * T and T in batch.cu_seqlens.tolist()


def test_unpacked_text_has_no_boundaries(tmp_path):
    _docs(tmp_path)
    source = D.DocumentStream(D.text_documents(str(tmp_path)), 16, pack=False, seed=0)
    batch = D.collate([source(0)], pack=False)
    assert batch.cu_seqlens is None and (batch.labels != D.IGNORE).all()


def test_megatron_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [np.arange(5, 5 + n, dtype=np.int32) % 97 for n in (7, 30, 3, 12)]
    docs[1][4] = 96
    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(prefix + ".idx")
    c = cfg.load([], ["data.task=megatron", f"data.path={prefix}", "train.seq_len=8", "model.vocab_size=128"])
    source = D.make_source(c)
    stream = np.concatenate(docs)
    tokens, labels, lens = source(0)
    s = int(np.flatnonzero([np.array_equal(stream[i:i + 8], tokens.numpy()) for i in range(0, len(stream) - 8, 8)])[0]) * 8
    assert sum(lens) == 8 and np.array_equal(tokens.numpy(), stream[s:s + 8])
    c = cfg.load([], ["data.task=megatron", f"data.path={prefix}", "train.seq_len=8", "model.vocab_size=64"])
    with pytest.raises(ValueError, match="holds token id 96 >= model.vocab_size = 64"):
        D.make_source(c)
    c = cfg.load([], ["data.task=megatron", f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="nope.bin does not exist"):
        D.make_source(c)


def test_global_batch_is_the_same_for_any_dp():
    source = D.MQAR(64, 256, 4, seed=0)

    def global_batch(dp, mb):
        rows = []
        for r in range(dp):
            for b in D.Loader(source, mb, 8, dp, r, pack=False).step(3):
                rows += [tuple(x.tolist()) for x in b.tokens]
        return sorted(rows)

    assert global_batch(1, 8) == global_batch(2, 4) == global_batch(4, 1) == global_batch(1, 2)
