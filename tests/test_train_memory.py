"""The memory report's replay of an allocation trace (the GPU allocator's record format): the
peak is found and the tensors alive at it are grouped by the seqpar line that made them."""
from seqpar.train.memory import peak_breakdown

MLP = {"filename": "/x/site-packages/seqpar/layers/mlp.py", "line": 20, "name": "_ffn"}
ATTN = {"filename": "/x/seqpar/sp/blockwise.py", "line": 300, "name": "attend"}
KERNEL = {"filename": "/x/kernels/seqpar_kernels/triton/delta.py", "line": 210, "name": "_prep"}
TORCH = {"filename": "/x/torch/nn/functional.py", "line": 5, "name": "linear"}
GIB = 2**30


def alloc(addr, gib, *frames):
    return {"action": "alloc", "addr": addr, "size": int(gib * GIB), "frames": list(frames)}


def free(addr, gib):
    return {"action": "free_completed", "addr": addr, "size": int(gib * GIB), "frames": []}


def test_peak_and_what_is_alive_there():
    trace = [alloc(1, 4, TORCH, MLP), alloc(2, 1, TORCH), free(1, 4),  # 4, 5, 1
             alloc(3, 3, ATTN), alloc(4, 2, TORCH, MLP), alloc(5, 1, KERNEL),  # 4, 6, 7 <- peak
             free(3, 3), alloc(6, 2, MLP)]  # 4, 6
    out = peak_breakdown(trace)
    assert out["peak_gib"] == 7
    groups = {g["where"]: (g["gib"], g["tensors"]) for g in out["groups"]}
    assert groups == {"seqpar/sp/blockwise.py:300 attend": (3, 1), "seqpar/layers/mlp.py:20 _ffn": (2, 1),
                      "/x/torch/nn/functional.py:5 linear": (1, 1), "seqpar_kernels/triton/delta.py:210 _prep": (1, 1)}
    assert [g["gib"] for g in out["groups"]] == sorted((g["gib"] for g in out["groups"]), reverse=True)
    assert not out["truncated"] and out["other_gib"] == 0


def test_top_groups_and_the_rest():
    trace = [alloc(i, 1, {"filename": f"/s/seqpar/m{i}.py", "line": i, "name": "f"}) for i in range(5)]
    out = peak_breakdown(trace, top=2)
    assert len(out["groups"]) == 2 and out["other_gib"] == 3 and out["peak_gib"] == 5
