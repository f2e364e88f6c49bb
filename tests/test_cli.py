"""``python -m iso_kernels prefill``: a full run on the tiny preset, and one clear error line for bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch

from iso_kernels import cli, launch

pytestmark = pytest.mark.slow  # every test here starts ranks or processes

TINY = ["prefill", "--model", "llama-tiny", "--seq-len", "40", "--repeats", "1", "--warmup", "0",
        "--comm-backend", "torch"]


def test_prefill_runs_and_writes_outputs(tmp_path, capsys):
    files = {name: tmp_path / name for name in ("report.json", "logits.pt", "trace.json", "gantt.png")}
    status = cli.main(TINY + ["--tp", "2", "--batch", "2", "--link", "ratio:0.5", "--split", "0.25",
                              "--generate", "3", "--json", str(files["report.json"]),
                              "--save-logits", str(files["logits.pt"]), "--trace", str(files["trace.json"]),
                              "--plot", str(files["gantt.png"])])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "overlap efficiency" in printed and "reduction" in printed
    report = json.loads(files["report.json"].read_text())
    for key in ("serial_ms", "iso_ms", "reduction", "split", "chunks", "tp", "seq_len", "device", "comm_backend",
                "max_abs_diff", "compute_ms", "comm_ms", "bound_ms", "overlap_efficiency"):
        assert key in report, key
    assert report["split"] == 10 and report["chunks"] == 2 and report["tp"] == 2
    assert report["iso_equals_serial_same_chunks"] and report["agree"]
    assert len(report["generated"]) == 2 and len(report["generated"][0]) == 3
    logits = torch.load(files["logits.pt"])
    assert set(logits) == {"serial", "iso"}
    assert logits["iso"].shape == (2, 40, 512) and logits["iso"].dtype == torch.float32
    assert (logits["iso"] - logits["serial"]).abs().max().item() == pytest.approx(report["max_abs_diff"])
    events = json.loads(files["trace.json"].read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert lanes == {"serial rank 0", "serial rank 1", "iso rank 0", "iso rank 1"}
    assert any(e.get("cat") == "comm" for e in events)
    assert files["gantt.png"].read_bytes()[:4] == b"\x89PNG"


def test_tokens_file_sets_the_prompt(tmp_path, capsys):
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps([[1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1]]))
    report_path = tmp_path / "r.json"
    assert cli.main(TINY + ["--tp", "1", "--tokens", str(prompt), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["seq_len"] == 7 and report["batch"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "1", "--chunks", "2"], "shorter than --chunks"),
    (["--split", "40"], "outside the prompt"),
    (["--split", "1.5"], "split"),
    (["--seq-len", "100000"], "positions"),
    (["--tp", "3"], "not divisible by tp=3"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--tp", "64", "--device", "cuda"], "cuda|GPUs"),
    (["--link", "warp"], "unknown link"),
    (["--model", "/nonexistent/model"], "neither a preset"),
    (["--dtype", "int8"], "--dtype"),
    (["--seq-len", "0"], "--seq-len"),
])
def test_bad_input_gives_one_error_line(extra, message, capsys):
    assert cli.main(TINY + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert any(part in err for part in message.split("|")), err


def test_bad_tokens_file(tmp_path, capsys):
    cases = {"ids.json": ("[1, 2, 99999]", "ids must lie in"), "empty.json": ("[[1, 2], []]", "non-empty lists"),
             "text.json": ("not json", "invalid JSON"), "object.json": ('{"a": 1}', "list of ids"),
             "mixed.json": ("[[1, 2], 3]", "list of ids"), "bools.json": ("[true, 2]", "integers")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        assert cli.main(TINY + ["--tokens", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err


def test_failure_inside_a_rank_is_one_line_and_no_rank_hangs(tmp_path):
    """A checkpoint whose weights are corrupt fails while the ranks load it: one line, exit 2, quickly."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    done = subprocess.run([sys.executable, "-m", "iso_kernels", *TINY, "--model", str(folder), "--tp", "2",
                           "--timeout", "60"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: rank") and "unreadable safetensors" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_runs_under_torchrun(tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(launch.free_port()), "-m", "iso_kernels", *TINY, "--tp", "2",
                           "--json", str(report_path)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("iso prefill:") == 1  # rank 0 reports, rank 1 stays quiet
    report = json.loads(report_path.read_text())
    assert report["tp"] == 2 and report["agree"]


def test_config_without_required_keys(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert cli.main(TINY + ["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "num_attention_heads" in err


def test_short_prompt_runs_without_calibration(tmp_path):
    report_path = tmp_path / "r.json"
    assert cli.main(TINY + ["--tp", "2", "--seq-len", "3", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["split_source"] == "trial" and {tuple(c["ends"]) for c in report["trial"]} == {(3,), (2, 3)}
    assert math.isnan(report["predicted_iso_ms"]) and report["agree"]


def test_nothing_to_overlap_keeps_the_prompt_whole(tmp_path):
    report_path = tmp_path / "r.json"
    assert cli.main(TINY + ["--tp", "1", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["split_source"] == "off" and report["bounds"] == [[0, 40]] and report["iso_equals_serial_same_chunks"]


def test_split_auto_times_its_candidates_once_then_uses_the_cached_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("ISO_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    run = TINY + ["--tp", "2", "--link", "ratio:1.0", "--seq-len", "48", "--generate", "0"]

    def report(*extra):
        path = tmp_path / "report.json"
        assert cli.main(run + ["--json", str(path), *extra]) == 0
        return json.loads(path.read_text())

    first = report()
    assert first["split_source"] == "trial" and first["trial_ms"] > 0
    timed = {tuple(c["ends"]): c["measured_iso_ms"] for c in first["trial"]}
    assert {(48,), (24, 48), (16, 32, 48)} <= set(timed)  # no split, the even two and three chunks, always
    assert all(math.isfinite(c["predicted_iso_ms"]) for c in first["trial"])
    most = max(c["rounds"] for c in first["trial"])
    finalists = {tuple(c["ends"]) for c in first["trial"] if c["rounds"] == most}
    default = tuple(first["trial_default"])
    assert default in finalists and default in timed  # the policy's plan races to the end
    # the fastest finalist; else the unsplit prompt where it is a finalist (the off rule); else the policy's plan
    allowed = {min(finalists, key=timed.get), default} | ({(48,)} & finalists)
    assert tuple(end for _, end in first["bounds"]) in allowed
    again = report()
    assert again["split_source"] == "cached" and again["trial"] == [] and again["bounds"] == first["bounds"]
    assert report("--recalibrate")["split_source"] == "trial"
    three = report("--chunks", "3")
    assert three["split_source"] != "cached" and three["chunks"] == 3  # its own cache entry, not the auto one's
