"""Training data: every sample is a pure function of its global index, so a run resumes from its
step number alone and a different number of data-parallel ranks sees the same global batches.

Tasks (data.task):
* mqar: multi-query associative recall. Key-value pairs sit at the start of the sequence, the
  queries (the same keys, in other orders) fill [T/2, 3T/4); the model must predict each value.
  With SP the pairs are on the first rank and the queries on another (both layouts, any P > 1), so
  only state passed between ranks can answer. Loss and accuracy count the answers only.
* passkey: a passkey (a few digits) after a marker near the start, asked for after a second marker at
  the middle; loss and accuracy count the passkey digits.
* text: plain text files read as bytes (byte-level tokenizer, id 256 ends a document).
* megatron: a Megatron indexed dataset (.bin/.idx) read through megatron-core.

text and megatron concatenate their documents into one stream cut into sequences; with data.pack
the document boundaries travel with the batch (cu_seqlens) so no token attends across documents.
A micro-batch of packed sequences is one row of micro_batch_size x seq_len tokens whose boundaries
include the row ends (the kernels take packed documents as batch size 1).
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqpar.sp import shard

IGNORE = -100
EOS = 256  # byte-level tokenizer: bytes are 0..255, 256 ends a document
BYTE_VOCAB = 257


@dataclass
class Batch:
    """Full sequences (every SP rank of a data-parallel replica holds the same batch)."""
    tokens: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE where no loss is taken
    cu_seqlens: torch.Tensor | None = None  # packed documents (then B == 1), global boundaries

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def local(self, group, layout: str, device) -> "Batch":
        """This SP rank's part of the tokens and labels; cu_seqlens stay global."""
        return Batch(shard(self.tokens, group, layout).to(device), shard(self.labels, group, layout).to(device),
                     None if self.cu_seqlens is None else self.cu_seqlens.to(device))


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, list[int] | None]], pack: bool) -> Batch:
    tokens = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples])
    if not pack:
        return Batch(tokens, labels)
    T, bounds = tokens.shape[1], [0]
    for row, (_, _, doc_lens) in enumerate(samples):
        for n in doc_lens or [T]:
            bounds.append(bounds[-1] + n)
    return Batch(tokens.reshape(1, -1), labels.reshape(1, -1), torch.tensor(bounds, dtype=torch.int64))


# ---------------------------------------------------------------- synthetic tasks


class MQAR:
    """Multi-query associative recall (Zoology's MQAR, placed for SP).

    Vocabulary: [0, K) keys, [K, 2K) values, 2K the filler (K = vocab / 4). The n key-value pairs
    "k v" open the sequence; from T/2 to 3T/4 the keys are asked again, as successive permutations of
    all n (so the first n queries of a sequence find their answers only at its start), each followed
    by its value, which is the target. Filler elsewhere."""

    def __init__(self, seq_len: int, vocab_size: int, num_pairs: int, seed: int):
        self.T, self.V, self.n, self.seed = seq_len, vocab_size, num_pairs, seed
        self.K = vocab_size // 4

    def __call__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        T, n, K = self.T, self.n, self.K
        tokens = torch.full((T,), 2 * K)
        keys = torch.randperm(K, generator=g)[:n]
        values = K + torch.randint(0, K, (n,), generator=g)
        tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
        q, slots = T // 2, T // 8
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-slots // n))])[:slots]
        tokens[q:q + 2 * slots:2], tokens[q + 1:q + 2 * slots:2] = keys[order], values[order]
        labels = torch.full((T,), IGNORE)
        labels[q:q + 2 * slots:2] = values[order]  # at a query key, predict its value
        return tokens, labels, None


class Passkey:
    """Vocabulary: 0 and 1 mark the passkey and the question, [2, 12) digits, the rest filler."""
    DIGITS = 5

    def __init__(self, seq_len: int, vocab_size: int, seed: int):
        self.T, self.V, self.seed = seq_len, vocab_size, seed

    def __call__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        T, n = self.T, self.DIGITS
        tokens = torch.randint(12, self.V, (T,), generator=g)
        key = 2 + torch.randint(0, 10, (n,), generator=g)
        where = int(torch.randint(0, T // 4 - n, (1,), generator=g))  # somewhere in the first quarter
        tokens[where], tokens[where + 1:where + 1 + n] = 0, key
        q = T // 2
        tokens[q], tokens[q + 1:q + 1 + n] = 1, key
        labels = torch.full((T,), IGNORE)
        labels[q:q + n] = key  # after the question mark, each next digit
        return tokens, labels, None


def synthetic_problem(config) -> str | None:
    """Why the synthetic task cannot be built from this config (None: it can)."""
    d, T, V = config.data, config.train.seq_len, config.model.vocab_size
    shards = config.parallel.sp * (2 if config.parallel.layout == "zigzag" else 1)
    if d.task == "mqar":
        if V < 4 * d.num_pairs:
            return f"data.num_pairs = {d.num_pairs} needs model.vocab_size >= {4 * d.num_pairs} (keys, values, filler)"
        if 2 * d.num_pairs > T // max(shards, 2):
            return (f"data.num_pairs = {d.num_pairs}: the {2 * d.num_pairs} pair tokens must fit in the first of "
                    f"{max(shards, 2)} parts of train.seq_len = {T}; lower num_pairs or raise seq_len")
    if d.task == "passkey":
        if V < 16:
            return f"data.task passkey needs model.vocab_size >= 16, got {V}"
        if T < 8 * (Passkey.DIGITS + 2):
            return f"data.task passkey needs train.seq_len >= {8 * (Passkey.DIGITS + 2)}, got {T}"
    return None


# ---------------------------------------------------------------- documents: text and Megatron indexed


class DocumentStream:
    """Documents laid end to end and cut into sequences of seq_len tokens (+1 for the last label).
    Sequence order is shuffled per pass with the data seed."""

    def __init__(self, docs, seq_len: int, pack: bool, seed: int):
        self.docs, self.T, self.pack, self.seed = docs, seq_len, pack, seed
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        if len(lengths) == 0 or lengths.sum() < seq_len + 1:
            raise ValueError(f"the documents hold {int(lengths.sum())} tokens, fewer than one sequence of "
                             f"{seq_len + 1}; add data or lower train.seq_len")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_sequences = int((self.offsets[-1] - 1) // seq_len)

    def _window(self, start: int, end: int) -> tuple[np.ndarray, list[int]]:
        """Tokens [start, end) of the stream and the lengths of the document pieces in it."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, lens, pos, i = [], [], start, first
        while pos < end:
            a, b = pos - self.offsets[i], min(end, self.offsets[i + 1]) - self.offsets[i]
            parts.append(np.asarray(self.docs[i][a:b], dtype=np.int64))
            lens.append(int(b - a))
            pos, i = self.offsets[i] + b, i + 1
        return np.concatenate(parts), lens

    def __call__(self, index: int):
        epoch, i = divmod(index, self.num_sequences)
        i = int(np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)[i])
        start = i * self.T
        window, lens = self._window(start, start + self.T + 1)
        tokens = torch.from_numpy(window[:-1].copy())
        labels = torch.from_numpy(window[1:].copy())
        # the window's last token only serves as a label; if it opens a new document, so does no token here
        doc_lens = lens[:-1] if lens[-1] == 1 else lens[:-1] + [lens[-1] - 1]
        if self.pack:  # no label crosses a document end
            ends = np.cumsum(doc_lens) - 1
            labels[torch.from_numpy(ends if lens[-1] == 1 else ends[:-1])] = IGNORE
        return tokens, labels, doc_lens


def text_documents(path: str) -> list[np.ndarray]:
    """Byte-tokenised documents: every file one document (a .jsonl file: one per line, its "text")."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else sorted(map(Path, glob.glob(path)))
    if not files:
        raise FileNotFoundError(f"data.path {path!r} matches no files")
    docs = []
    for f in files:
        texts = ([json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
                 if f.suffix == ".jsonl" else [f.read_bytes()])
        for t in texts:
            raw = t.encode() if isinstance(t, str) else t
            docs.append(np.concatenate([np.frombuffer(raw, dtype=np.uint8).astype(np.int64), [EOS]]))
    return docs


def megatron_documents(prefix: str):
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError as e:
        raise RuntimeError("data.task: megatron reads indexed datasets through megatron-core; install it with "
                           "`pip install megatron-core`") from e
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise FileNotFoundError(f"data.path {prefix!r}: {prefix + suffix} does not exist (give the prefix, "
                                    f"without .bin/.idx)")
    return IndexedDataset(prefix)


def make_source(config):
    """index -> (tokens [T], labels [T], document lengths or None)."""
    d, T, V = config.data, config.train.seq_len, config.model.vocab_size
    if d.task == "mqar":
        return MQAR(T, V, d.num_pairs, d.seed)
    if d.task == "passkey":
        return Passkey(T, V, d.seed)
    docs = text_documents(d.path) if d.task == "text" else megatron_documents(d.path)
    if d.task == "text" and V < BYTE_VOCAB:
        raise ValueError(f"data.task text uses a byte-level tokenizer with {BYTE_VOCAB} ids; set model.vocab_size "
                         f">= {BYTE_VOCAB}")
    if d.task == "megatron":
        top = max(int(np.max(docs[i])) for i in range(min(len(docs), 64)))
        if top >= V:
            raise ValueError(f"data.path {d.path!r} holds token id {top} >= model.vocab_size = {V}")
    return DocumentStream(docs, T, d.pack, d.seed)


class Loader:
    """The micro-batches of one step for one data-parallel rank.

    Step s uses samples [s * G, (s + 1) * G) of the global order (G = global batch size); micro-batch m
    of data-parallel rank r holds samples s * G + (m * dp + r) * mb + [0, mb)."""

    def __init__(self, source, micro_batch_size: int, global_batch_size: int, dp: int, dp_rank: int, pack: bool):
        self.source, self.mb, self.gbs, self.dp, self.dp_rank = source, micro_batch_size, global_batch_size, dp, dp_rank
        self.pack = pack and isinstance(source, DocumentStream)
        self.accumulation = global_batch_size // (micro_batch_size * dp)

    def step(self, step: int) -> list[Batch]:
        out = []
        for m in range(self.accumulation):
            first = step * self.gbs + (m * self.dp + self.dp_rank) * self.mb
            out.append(collate([self.source(first + i) for i in range(self.mb)], self.pack))
        return out
