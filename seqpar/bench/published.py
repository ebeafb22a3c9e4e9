"""Published SP-efficiency points of LASP-2 and ZeCO, drawn beside the cost model's curves.

Only numbers found in public material are here, each with where it comes from and what it
measures; every efficiency is computed from the raw numbers below, never typed in. The primary
PDFs were not reachable from the machine this was written on: the tables were read from public
transcriptions (named in `SOURCES`), and where the papers' own abstracts state a number it was
checked against them (noted per series). docs/cost_model.md discusses how these points relate to
the model's figure of merit (they are *not* the same measurement).
"""
from __future__ import annotations

SOURCES = {
    "lasp2": "Sun et al. 2025, 'LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid', "
             "arXiv 2502.07563, Table 6 ('Quantitative Scalability Results of LASP-2 on Throughput (tokens/sec) "
             "and Memory Usage Per GPU (GB)'; Linear-Llama3-1B, A100 80GB); read from the transcription of the "
             "arXiv HTML tables in github.com/TikaToka/ai-paper-reviewer, content/paper-reviews/2502.07563/index.md",
    "zeco": "Chou et al. 2025, 'ZeCO: Zero Communication Overhead Sequence Parallelism for Linear Attention', "
            "arXiv 2507.01004, model-level throughput table (1B-GLA, 32K tokens per GPU, tokens/s per GPU; "
            "LASP-1, LASP-2, ZeCO and a data-parallel baseline without SP); read from a public secondary "
            "summary ('192: ZeCO All-Scan - Fused Gather + Prefix Sum for Linear Attention SP', public code "
            "index), which does not give the table's number. Its 256-GPU row agrees with the paper's abstract "
            "(arXiv abs page): 'on 256 GPUs with an 8M sequence length, ZeCO achieves a 60% speedup' over "
            "LASP-2 (40967 / 25402 = 1.61).",
}

# LASP-2 Table 6 at 16K tokens per GPU (the largest per-GPU length present at all four GPU counts):
# (GPUs, sequence length, throughput in tokens/s for the whole sequence).
_LASP2_TABLE6_16K_PER_GPU = [(16, 256 * 1024, 135635), (32, 512 * 1024, 250586),
                             (64, 1024 * 1024, 442221), (128, 2048 * 1024, 769030)]

# ZeCO model throughput, tokens/s per GPU: GPUs -> {method: value}; '-' rows are absent there.
_ZECO_MODEL_THROUGHPUT = {
    8: {"lasp1": 27014, "lasp2": 42946, "zeco": 47369, "dp": 49633},
    64: {"lasp1": 12268, "lasp2": 37485, "zeco": 44468, "dp": 48230},
    128: {"lasp2": 33327, "zeco": 43278, "dp": 47848},
    256: {"lasp2": 25402, "zeco": 40967, "dp": 46588},
}


def published_points() -> list[dict]:
    """One dict per point: series, method, P, efficiency, what it measures, source key, raw numbers."""
    points = []
    p0, n0, thr0 = _LASP2_TABLE6_16K_PER_GPU[0]
    for P, n, thr in _LASP2_TABLE6_16K_PER_GPU:
        points.append({
            "series": "LASP-2 paper, Table 6 (A100, 16K tok/GPU, vs 16 GPUs)", "method": "lasp2", "P": P,
            "efficiency": (thr / P) / (thr0 / p0),
            "measures": "weak scaling of a whole 1B model: tokens/s per GPU at 16K tokens per GPU, relative to "
                        "the same at 16 GPUs (the table has no 1-GPU point)",
            "source": "lasp2", "raw": {"gpus": P, "sequence_length": n, "tokens_per_s": thr},
        })
    for P, row in sorted(_ZECO_MODEL_THROUGHPUT.items()):
        for method in ("zeco", "lasp2", "lasp1"):
            if method in row:
                points.append({
                    "series": f"ZeCO paper: {method.upper().replace('LASP', 'LASP-')} (1B-GLA, 32K tok/GPU, vs DP)",
                    "method": method, "P": P, "efficiency": row[method] / row["dp"],
                    "measures": "whole 1B-GLA model: tokens/s per GPU with the SP method over tokens/s per GPU of "
                                "data parallelism without SP, same GPU count, 32K tokens per GPU",
                    "source": "zeco", "raw": {"gpus": P, "tokens_per_s_per_gpu": row[method],
                                              "dp_tokens_per_s_per_gpu": row["dp"]},
                })
    return points
