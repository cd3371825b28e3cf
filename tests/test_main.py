"""main(): bad input fails fast and clearly; the quick run writes every output; faults and interruptions
lose nothing that finished."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------- bad input
BAD = [
    (["--rank", "0"], "--rank must be between 1 and 16"),
    (["--rank", "17"], "--rank must be between 1 and 16"),
    (["--rank", "11", "--no-train-head"], "--rank must be between 1 and 10"),
    (["--alpha", "0"], "--alpha must be positive"),
    (["--lr=-0.001"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--finetune-epochs", "0"], "--finetune-epochs must be at least 1"),
    (["--patience", "-1"], "--patience must be at least 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--methods", "base,lorra"], "unknown method(s) lorra: choose from base, full, lora, dora, qlora"),
    (["--methods", "lora,base"], "base must come first in --methods"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_flags_fail_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(main, "load_mnist", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, out, err = run(capsys, *argv, "--out-dir", tmp_path)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("constant, value, message", [
    ("RANK", 0, "--rank must be between 1 and 16"), ("LEARNING_RATE", 0.0, "--lr must be positive"),
    ("PATIENCE", -2, "--patience must be at least 0"), ("METHODS", "base,ia3", "unknown method(s) ia3"),
    ("LORA_DROPOUT", 1.5, "--dropout must be in [0, 1)"), ("BATCH_SIZE", 0, "--batch-size must be at least 1")])
def test_bad_constants_are_caught_like_flags(capsys, tmp_path, monkeypatch, constant, value, message):
    monkeypatch.setattr(main, constant, value)
    monkeypatch.setattr(main, "load_mnist", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, _, err = run(capsys, "--out-dir", tmp_path)
    assert code == 2 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    code, _, err = run(capsys, "--device", "cuda", "--out-dir", tmp_path)
    assert code == 2 and "no CUDA device is available" in err


def test_out_dir_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run(capsys, "--out-dir", blocker / "plots")
    assert code == 2 and "cannot write to --out-dir" in err


def test_adapters_without_a_base_need_its_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "--methods", "lora", "--out-dir", tmp_path)
    assert code == 2 and "add base to --methods" in err


def test_missing_data_is_one_sentence_without_traceback(tmp_path):
    """As a user sees it, in a fresh process with no network: exit code 2, a message, no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--quick", "--data-dir", str(tmp_path / "none"),
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "MNIST is missing from" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr


# --------------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, mnist_dir):
    """One --quick run of all four methods, shared by the tests below."""
    out = tmp_path_factory.mktemp("quick")
    code = main.main(["--quick", "--data-dir", str(mnist_dir), "--out-dir", str(out)])
    return code, out


def test_quick_run_writes_every_output_with_sane_numbers(quick_run):
    code, out = quick_run
    assert code == 0
    for name in main.PLOT_FILES:
        assert (out / name).stat().st_size > 10_000, name
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base", "full", "lora", "dora", "qlora"]
    assert results["config"]["rank"] == main.RANK and results["environment"]["torch"] == torch.__version__
    base = results["methods"]["base"]
    for method, r in results["methods"].items():
        assert r["status"] == "ok", method
        assert 85 < r["test_acc"] <= 100 and r["train_time_s"] > 0 and 1 <= r["epochs_run"] <= 2
        assert r["cuda_peak_bytes"] is None  # CPU: not measured, never a fake 0
        assert r["train_state_bytes"] == r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        if method in ("lora", "dora", "qlora"):
            assert r["trainable_params"] <= 0.10 * base["total_params"]
    assert results["methods"]["dora"]["trainable_params"] > results["methods"]["lora"]["trainable_params"]
    qlora = results["methods"]["qlora"]
    assert qlora["frozen_weight_bytes"] <= 0.20 * qlora["frozen_weight_fp32_bytes"]
    assert qlora["weight_bytes"] < 0.5 * results["methods"]["lora"]["weight_bytes"]
    table = (out / "results.md").read_text()
    assert all(name in table for name in ("| Base |", "| Full FT |", "| LoRA |", "| DoRA |", "| QLoRA |"))
    full = results["methods"]["full"]
    assert full["trainable_params"] == full["total_params"] == base["total_params"]
    assert (out / "full_finetuned.pt").stat().st_size == full["file_bytes"]
    assert (out / "base_model.pt").is_file()
    for method, r in results["methods"].items():  # after training: files and inference cost
        assert r["file_bytes"] > 0 and r["latency_ms"]["merged"]["1000"] > 0
        assert r["merged_max_abs_logit_diff"] < 1e-3
        if method not in main.PLAIN_FILES:
            assert (out / "adapters" / f"{method}.pt").stat().st_size == r["file_bytes"]
            assert r["file_bytes"] < 0.2 * r["full_model_file_bytes"]
            assert main.load_adapter(out / "base_model.pt", out / "adapters" / f"{method}.pt")
    assert "| method | saved file (KiB) |" in table


def test_quick_run_console_summary(quick_run, mnist_dir, capsys):
    """The closing lines, as the old README showed them (re-printed from a --resume of the same run)."""
    _, out = quick_run
    code, stdout, _ = run(capsys, "--quick", "--resume", "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 0 and "Epoch " not in stdout  # everything was kept, nothing retrained
    for name in ("Base", "Full FT", "LoRA", "DoRA", "QLoRA"):
        assert f"{name} Model Test Accuracy: " in stdout


# --------------------------------------------------------------------------- faults and interruptions
def copy_base(quick_run, tmp_path):
    """A fresh out-dir holding only the quick run's base checkpoint."""
    (tmp_path / "base_model.pt").write_bytes((quick_run[1] / "base_model.pt").read_bytes())
    return tmp_path


def test_missing_bitsandbytes_skips_qlora_only(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    def unavailable():
        raise main.BitsAndBytesUnavailable("bitsandbytes cannot be imported (ImportError: no module)")
    monkeypatch.setattr(main, "import_bitsandbytes", unavailable)
    out = copy_base(quick_run, tmp_path)
    code, stdout, _ = run(capsys, "--quick", "--methods", "qlora,lora", "--data-dir", mnist_dir, "--out-dir", out)
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert code == 0 and methods["qlora"]["status"] == "skipped" and methods["lora"]["status"] == "ok"
    assert "QLoRA skipped: bitsandbytes cannot be imported" in stdout


def test_divergence_fails_that_method_and_the_others_still_run(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    real_run = main.run_method

    def lora_diverges(method, *args):
        if method == "lora":
            args[2].lr = 1e30  # a huge learning rate, for LoRA alone
        try:
            return real_run(method, *args)
        finally:
            args[2].lr = main.LEARNING_RATE
    monkeypatch.setattr(main, "run_method", lora_diverges)
    out = copy_base(quick_run, tmp_path)
    code, stdout, _ = run(capsys, "--quick", "--methods", "lora,dora", "--data-dir", mnist_dir, "--out-dir", out)
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert code == 1
    assert methods["lora"] == {"status": "failed", "reason": methods["lora"]["reason"]}
    assert methods["lora"]["reason"].startswith("diverged at epoch 1") and methods["dora"]["status"] == "ok"
    assert "LoRA Model Test Accuracy: failed (diverged at epoch 1" in stdout


def test_cuda_out_of_memory_names_the_method_and_a_remedy(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    def oom(method, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(main, "run_method", oom)
    out = copy_base(quick_run, tmp_path)
    code, stdout, _ = run(capsys, "--quick", "--methods", "dora", "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 1 and "DoRA ran out of CUDA memory: try a smaller --batch-size" in stdout


def test_interrupt_keeps_finished_methods_and_resume_continues(capsys, mnist_dir, tmp_path, monkeypatch):
    real_run, calls = main.run_method, []

    def interrupted_at_lora(method, *args):
        calls.append(method)
        if method == "lora" and calls.count("lora") == 1:
            raise KeyboardInterrupt
        return real_run(method, *args)
    monkeypatch.setattr(main, "run_method", interrupted_at_lora)
    argv = ["--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1",
            "--data-dir", mnist_dir, "--out-dir", tmp_path]
    code, _, err = run(capsys, *argv)
    assert code == 130 and "Interrupted during LoRA" in err and "--resume" in err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["base"] and (tmp_path / "base_model.pt").is_file()
    assert (tmp_path / main.PLOT_FILES[2]).is_file()  # the finished base is plotted too

    code, _, _ = run(capsys, *argv, "--resume")
    assert code == 0 and calls == ["base", "lora", "lora"]  # the base was not trained again
    resumed = json.loads((tmp_path / "results.json").read_text())
    kept = {k: v for k, v in resumed["methods"]["base"].items() if k in saved["methods"]["base"]}
    assert kept == saved["methods"]["base"] and resumed["methods"]["lora"]["status"] == "ok"
    assert "latency_ms" in resumed["methods"]["base"]  # measured at the end, resumed methods included

    code, _, err = run(capsys, *argv[:-2], "--lr", "1e-2", "--data-dir", mnist_dir, "--out-dir", tmp_path, "--resume")
    assert code == 2 and "other settings (lr differ)" in err


def test_sigterm_is_handled_like_ctrl_c(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    import signal
    real_run = main.run_method

    def terminated_at_dora(method, *args):
        if method == "dora":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run(method, *args)
    monkeypatch.setattr(main, "run_method", terminated_at_dora)
    previous = signal.getsignal(signal.SIGTERM)
    out = copy_base(quick_run, tmp_path)
    code, _, err = run(capsys, "--quick", "--methods", "lora,dora", "--finetune-epochs", "1",
                       "--data-dir", mnist_dir, "--out-dir", out)
    assert signal.getsignal(signal.SIGTERM) is previous  # main() puts the caller's handler back
    assert code == 130 and "Interrupted during DoRA" in err
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["lora"]


def test_a_cuda_run_shows_its_peak_in_table_console_and_plot(quick_run, capsys, tmp_path):
    """What a CUDA run reports, checked here from a CPU run's results with a peak filled in."""
    results = json.loads((quick_run[1] / "results.json").read_text())
    for r in results["methods"].values():
        r["cuda_peak_bytes"] = 3 * 2**20
    assert "| 3.00 |" in main.results_table(results) and "n/a (CPU)" not in main.results_table(results)
    main.report_method(results["methods"]["lora"])
    assert "Max memory allocated: 3.00 MiB (CUDA peak above the shared dataset and base model)" in capsys.readouterr().out
    assert main.PLOT_FILES[4] in main.plot_results(results, tmp_path)


def test_resume_keeps_only_methods_whose_saved_model_is_still_there(capsys, quick_run, mnist_dir, tmp_path):
    out = tmp_path
    for name in ("results.json", "base_model.pt", "full_finetuned.pt"):
        (out / name).write_bytes((quick_run[1] / name).read_bytes())
    (out / "adapters").mkdir()
    for name in ("lora.pt", "lora.json"):  # dora's and qlora's adapter files are gone
        (out / "adapters" / name).write_bytes((quick_run[1] / "adapters" / name).read_bytes())
    code, stdout, _ = run(capsys, "--quick", "--resume", "--methods", "base,full,lora,dora", "--data-dir", mnist_dir,
                          "--out-dir", out)
    assert code == 0
    assert stdout.count("finished in a previous run (results.json), kept.") == 3  # base, full, lora
    assert "Fine-tuning the base model with DoRA..." in stdout
