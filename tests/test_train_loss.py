"""The chunked, vocab-parallel cross-entropy equals the plain one on full logits (float64)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqpar.testing import run_ranks
from seqpar.train.data import IGNORE
from seqpar.train.loss import cross_entropy


def _case(seed=0, B=2, T=37, H=16, V=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.t()
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    loss.backward()
    valid = labels != IGNORE
    correct = (logits.argmax(-1) == labels)[valid].sum()
    return loss.detach(), correct, h.grad, w.grad


def test_chunked_matches_full_logits():
    hidden, weight, labels = _case()
    ref = _reference(hidden, weight, labels)
    for chunk in (1, 7, 1000):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, correct = cross_entropy(h, w, labels, chunk=chunk)
        (2.5 * loss).backward()
        torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
        assert correct == ref[1]
        torch.testing.assert_close(h.grad, 2.5 * ref[2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w.grad, 2.5 * ref[3], rtol=1e-10, atol=1e-12)


def test_no_labels_gives_zero_and_zero_gradient():
    hidden, weight, labels = _case()
    h = hidden.clone().requires_grad_()
    loss, correct = cross_entropy(h, weight, torch.full_like(labels, IGNORE))
    loss.backward()
    assert loss == 0 and correct == 0 and torch.count_nonzero(h.grad) == 0


def _vocab_parallel(rank, world):
    import torch.distributed as dist

    hidden, weight, labels = _case(seed=1, V=52)
    ref = _reference(hidden, weight, labels)
    rows = weight.shape[0] // world
    h = hidden.clone().requires_grad_()
    w = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss, correct = cross_entropy(h, w, labels, chunk=9, tp_group=dist.group.WORLD, vocab_start=rank * rows)
    loss.backward()
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
    assert correct == ref[1]
    torch.testing.assert_close(h.grad, ref[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref[3][rank * rows:(rank + 1) * rows], rtol=1e-10, atol=1e-12)
    return True


def test_vocab_parallel_over_two_ranks():
    assert run_ranks(_vocab_parallel, 2) == [True, True]
