"""The decision table and single plans (``tables.decision``, ``python -m iso_kernels plan``): each cell is
``planning.plan()``'s answer; the command line, its errors, and the table published in bench/README.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iso_kernels import cli, models
from iso_kernels.hardware import HARDWARE_PRESETS
from iso_kernels.planning import plan
from iso_kernels.tables import decision
from iso_kernels.tables.decision import TABLE_GPUS, TABLE_MODELS, TABLE_SEQ_LENS, TABLE_TPS

ROOT = Path(__file__).resolve().parents[2]
# meta-llama/Llama-2-7b-hf's config.json, the keys the model reads.
HF_LLAMA7 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "hidden_act": "silu",
             "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


# --- the table ---
def test_the_table_models_are_published_shapes():
    assert set(TABLE_MODELS) <= set(models.PUBLISHED)


def test_each_row_holds_plan_s_answers_and_the_memory_flag():
    rows = decision.decision_table(["rtx4090-pcie4"], {"llama2-70b": models.config("llama2-70b")}, (2, 8),
                                   (512, 4096), batch=2, min_gain=0.05, max_chunks=3)
    assert [(r["gpu"], r["model"], r["tp"]) for r in rows] == [("rtx4090-pcie4", "llama2-70b", 2),
                                                                ("rtx4090-pcie4", "llama2-70b", 8)]
    for r in rows:
        assert r["impossible"] is None
        assert r["plans"] == plan(models.config("llama2-70b"), r["tp"], [512, 4096], hardware="rtx4090-pcie4",
                                  batch=2, min_gain=0.05, max_chunks=3)
    # 70B: 128 GiB of bf16 weights; an RTX 4090 holds 24 GiB
    assert [r["fits_memory"] for r in rows] == [False, True]


def test_a_tp_that_does_not_divide_the_model_is_marked_not_raised():
    (row,) = decision.decision_table(["a800-nvlink"], {"llama2-7b": models.config("llama2-7b")}, (3,), (4096,))
    assert row["plans"] is None and "attention heads (32) are not divisible by tp=3" in row["impossible"]
    text = decision.format_decision_table([row], (4096,))
    assert "impossible (attention heads (32) are not divisible by tp=3)" in text


def test_an_unknown_gpu_names_the_argument():
    with pytest.raises(ValueError, match="--hardware: unknown preset 'v100'"):
        decision.decision_table(["v100"])


# --- command line ---
def test_cli_plan(capsys):
    assert cli.main(["plan", "--model", "llama2-70b", "--tp", "8", "--seq-len", "100,4096",
                     "--hardware", "a800-nvlink"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "seq_len=100" in first and "off, prompt too short" in first
    assert "seq_len=4096" in second and "chunks, ends" in second and "gain" in second
    expected = plan(models.config("llama2-70b"), 8, 4096, hardware="a800-nvlink")
    assert f"ends {list(expected.ends)}" in second and f"gain {expected.gain:.1%}" in second


def test_cli_plan_of_a_config_file_as_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(HF_LLAMA7))
    assert cli.main(["plan", "--model", str(config), "--tp", "4", "--seq-len", "4096", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    (got,) = row["plans"]
    expected = plan(HF_LLAMA7, 4, 4096, hardware="h100-nvlink")
    assert row["gpu"] == "h100-nvlink" and got["ends"] == list(expected.ends) and got["gain"] == expected.gain
    assert got["seq_len"] == 4096 and got["off"] is expected.off and got["off_rule"] == expected.off_rule


def test_cli_plan_of_a_checkpoint_folder_and_its_knobs(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(HF_LLAMA7))
    assert cli.main(["plan", "--model", str(tmp_path), "--tp", "2", "--seq-len", "2048,8192", "--batch", "2",
                     "--min-gain", "0.05", "--max-chunks", "2", "--hardware", "rtx4090-pcie4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    expected = plan(HF_LLAMA7, 2, [2048, 8192], hardware="rtx4090-pcie4", batch=2, min_gain=0.05, max_chunks=2)
    assert [p["ends"] for p in row["plans"]] == [list(p.ends) for p in expected]
    assert [p["predicted_iso_s"] for p in row["plans"]] == [p.predicted_iso_s for p in expected]
    assert all(len(p["ends"]) <= 2 for p in row["plans"])


def test_cli_plan_rejects_a_bad_tp(capsys):
    assert cli.main(["plan", "--model", "llama2-7b", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: attention heads (32) are not divisible by tp=3"


@pytest.mark.parametrize("option, value", [("--tp", "0"), ("--batch", "0"), ("--max-chunks", "-1"),
                                           ("--max-chunks", "0"), ("--seq-len", "0")])
def test_cli_plan_names_a_bad_number_in_one_line(capsys, option, value):
    """A new user's ``plan --tp 0`` once ended in a ZeroDivisionError traceback (the table's memory column)."""
    assert cli.main(["plan", option, value]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {option} must be >= 1, got {value}"


@pytest.mark.parametrize("argv, message", [
    (["--min-gain", "1.5"], "error: --min-gain must be in [0, 1), got 1.5"),
    (["--min-gain", "-0.1"], "error: --min-gain must be in [0, 1), got -0.1"),
    (["--hardware", "nope"], "error: --hardware: unknown preset 'nope'; known: "),
    (["--model", "nope"], "error: --model 'nope' is neither a registered model ("),
    (["--markdown"], "error: --markdown needs --table"),
    (["--table", "--tp", "0"], "error: --tp must be >= 1, got 0"),
])
def test_cli_plan_names_a_bad_argument_in_one_line(capsys, argv, message):
    assert cli.main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert captured.out == ""


def test_cli_plan_names_a_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("not json")
    assert cli.main(["plan", "--model", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model {bad}: invalid JSON")
    bad.write_text(json.dumps({"hidden_size": 64}))
    assert cli.main(["plan", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config.json lacks") and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("argv, line", [(["plan", "--tp", "0"], "error: --tp must be >= 1, got 0"),
                                        (["simulate", "--batch", "0"], "error: batch must be >= 1, got 0")])
def test_the_module_entry_point_prints_one_line_not_a_traceback(argv, line):
    done = subprocess.run([sys.executable, "-m", "iso_kernels", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [line], done.stderr


def test_cli_table_is_the_published_one(capsys):
    assert cli.main(["plan", "--table", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    lines = table.splitlines()
    links = sum(len(HARDWARE_PRESETS[gpu].links) for gpu in TABLE_GPUS)  # a row set per GPU and collective
    expected_rows = links * len(TABLE_MODELS) * len(TABLE_TPS)
    assert len(lines) == 2 + expected_rows and links > len(TABLE_GPUS)
    assert lines[0].startswith("| GPU | all-reduce | model | TP | fits | 256 | 512 | 1k")
    assert table in (ROOT / "bench" / "README.md").read_text(), \
        "bench/README.md's decision table is stale: python -m iso_kernels plan --table --markdown"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert len(TABLE_SEQ_LENS) == lines[0].count("|") - 6


def test_the_2026_table_is_published_and_turns_mixtures_of_experts_off_where_chunks_cost_more(capsys):
    assert cli.main(["plan", "--table", "2026", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in (ROOT / "bench" / "README.md").read_text(), \
        "bench/README.md's 2026 table is stale: python -m iso_kernels plan --table 2026 --markdown"
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:4]): line for line in table.splitlines()[2:]}
    # Every expert a chunk reaches runs again per chunk: short MoE prompts stay whole, long ones split.
    def off(model):
        return [cell.strip().startswith("off") for cell in rows["h100-nvlink", "multimem", model, "8"].split("|")[6:-1]]

    assert off("mixtral-8x22b") == [True, True] + [False] * 5
    assert sum(off("qwen3-32b")) < sum(off("mixtral-8x22b"))


def test_cli_table_as_json_and_plain(capsys):
    argv = ["plan", "--table", "--hardware", "a800-nvlink", "--model", "llama2-70b", "--tp", "8",
            "--seq-len", "512,4096"]
    assert cli.main([*argv, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    expected = plan(models.config("llama2-70b"), 8, [512, 4096], hardware="a800-nvlink")
    assert [p["ends"] for p in row["plans"]] == [list(p.ends) for p in expected]
    assert cli.main(argv) == 0
    header, body = capsys.readouterr().out.rstrip("\n").splitlines()
    assert header.split()[:5] == ["GPU", "all-reduce", "model", "TP", "fits"] and header.split()[5:] == ["512", "4k"]
    assert body.split()[:5] == ["a800-nvlink", "nccl", "llama2-70b", "8", "yes"] and len(body) == len(header)
    assert body.endswith("  ".join(decision._cell(p) for p in expected))  # e.g. "26.6% (2: .50)"
