"""`seqpar config import` on the three Megatron-LM formats (an argument list in a launch script, a
functional-test model_config.yaml, a --yaml-cfg file): the values land in the right sections,
every source argument is accounted for, and the imported model builds and takes training steps."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from seqpar.cli import main as seqpar_main
from seqpar.megatron.config_import import import_config, parse_argument_list, read_source
from seqpar.models import HybridLM, ModelConfig

DATA = Path(__file__).parent / "data" / "megatron"


def accounted(imported) -> set[str]:
    """Every flag named in one of the four lists."""
    lines = imported.used + imported.matching + imported.differs + imported.unused
    return {line.split()[0].rstrip(":") for line in lines}


def test_argument_list_of_a_hybrid_launch_script():
    imp = import_config(DATA / "pretrain_hybrid.sh")
    assert imp.fmt == "argument list"
    m, p, t = imp.sections["model"], imp.sections["parallel"], imp.sections["train"]
    assert (m["hidden_size"], m["num_heads"], m["num_kv_heads"], m["ffn_hidden_size"]) == (256, 8, 2, 704)
    assert m["pattern"] == "M-M-M-*-M-M-M-*-" and m["num_layers"] == 8  # 16 Megatron layers = 8 mixer+MLP blocks
    assert m["linear_variant"] == "simple_gla" and m["rope_base"] == 500000.0 and m["tie_embeddings"] is False
    assert m["vocab_size"] == 50432  # 50257 padded to 128 x TP
    assert p == dict(tp=2, pp=1, sp=2, softmax_method="ring", layout="zigzag", method="lasp2", dp=2)  # 8 GPUs
    assert (t["seq_len"], t["micro_batch_size"], t["global_batch_size"], t["steps"]) == (4096, 1, 32, 1000)
    assert t["betas"] == [0.9, 0.95] and t["precision"] == "bf16" and t["checkpointing"] == "full"
    assert imp.sections["data"] == {"task": "megatron", "path": "/data/pile/pile_text_document"}  # $DATA_PATH resolved
    assert any("--mamba-state-dim" in d for d in imp.differs)
    assert "--tokenizer-type" in accounted(imp) and "--recompute-method" in accounted(imp)
    source = read_source(DATA / "pretrain_hybrid.sh")[1]
    assert {f"--{k.replace('_', '-')}" for k in source} <= accounted(imp)  # nothing dropped silently
    assert ModelConfig.from_dict(m).layer_kinds() == ("simple_gla",) * 3 + ("softmax",) + ("simple_gla",) * 3 + ("softmax",)


def test_functional_test_model_config():
    imp = import_config(DATA / "model_config.yaml")
    assert imp.fmt == "functional-test model_config.yaml"
    m, p = imp.sections["model"], imp.sections["parallel"]
    assert (p["tp"], p["pp"], p["sp"]) == (2, 2, 1) and imp.sections["train"]["engine"] == "megatron"
    assert m["pattern"] == "LLLS" and m["num_layers"] == 8 and m["tie_embeddings"] is True
    assert m["vocab_size"] == 1024 and m["ffn_hidden_size"] == 320  # Megatron-LM's SwiGLU default for 128
    assert any(d.startswith("--num-experts 8") for d in imp.differs)
    assert any(d.startswith("--sequence-parallel") for d in imp.differs)
    assert any("${DATA_PATH}" in n and "unresolved" in n for n in imp.notes)
    source = read_source(DATA / "model_config.yaml")[1]
    assert {f"--{k.replace('_', '-')}" for k in source} <= accounted(imp)


def test_yaml_cfg_file():
    imp = import_config(DATA / "gpt_yaml_cfg.yaml", pattern="LS", linear_variant="gla")
    assert imp.fmt == "--yaml-cfg file"
    m, p = imp.sections["model"], imp.sections["parallel"]
    assert (m["num_kv_heads"], m["norm_eps"], m["vocab_size"], m["pattern"]) == (2, 1e-6, 320, "LS")
    assert p["sp"] == 2 and imp.sections["train"]["seq_len"] == 512
    assert any(d.startswith("--normalization LayerNorm") for d in imp.differs)
    assert "--eval-iters" in accounted(imp)


def test_defaults_that_differ_are_listed(tmp_path):
    f = tmp_path / "args.txt"
    f.write_text("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --weird-flag x\n")
    imp = import_config(f)
    text = "\n".join(imp.differs)
    for words in ("GELU", "normalization LayerNorm (Megatron-LM default)", "learned_absolute",
                  "no biases", "no dropout"):
        assert words in text, words
    assert "--weird-flag 'x'" in imp.unused


def test_argument_list_parsing():
    args = parse_argument_list('L=12\nexport H=64\nA=(\n --num-layers $L --hidden-size=${H} # a comment\n'
                               ' --data-path 0.3 a 0.7 b \\\n --bf16 )\npython train.py --lr 1e-4\n')
    assert args == {"num_layers": 12, "hidden_size": 64, "data_path": [0.3, "a", 0.7, "b"], "bf16": True, "lr": 1e-4}


def test_bad_sources_say_what_is_wrong(tmp_path):
    f = tmp_path / "a.sh"
    f.write_text("--num-layers 4 --num-attention-heads 4\n")
    with pytest.raises(ValueError, match="missing --hidden-size"):
        import_config(f)
    f.write_text("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --hybrid-override-pattern M-E-\n")
    with pytest.raises(ValueError, match="MoE"):
        import_config(f)
    f.write_text("--num-layers 4 --hidden-size 64 --num-attention-heads 6\n")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        import_config(f)


def test_cli_writes_a_config_that_trains(tmp_path, capsys):
    out = tmp_path / "imported.yaml"
    assert seqpar_main(["config", "import", str(DATA / "gpt_yaml_cfg.yaml"), "-o", str(out)]) == 0
    assert "differs" in capsys.readouterr().err
    text = out.read_text()
    assert text.startswith("# imported ")
    doc = yaml.safe_load(text)
    assert set(doc) == {"model", "parallel", "train"}
    if importlib.util.find_spec("seqpar.config"):  # the trainer's schema, when it is part of this tree
        from seqpar.config import load

        load([out], ["train.device=cpu"])
    # the imported model trains: a few steps on one repeated batch lower the loss
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(doc["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, doc["model"]["vocab_size"], (2, 33))
    losses = []
    for _ in range(4):
        hidden = model(data[:, :-1])
        loss = F.cross_entropy((hidden @ model.output_weight.T).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert seqpar_main(["config", "import", str(tmp_path / "missing.sh")]) == 2
