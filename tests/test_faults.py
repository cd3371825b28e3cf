"""Faults and hostile files: each case the README's "When things go wrong" promises, reproduced."""
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import main
from test_main import ROOT, run

SMALL = ["--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, mnist_dir):
    """base + LoRA, one epoch each on the quick subset: an out-dir to damage, copied per test."""
    out = tmp_path_factory.mktemp("small")
    assert main.main(SMALL + ["--data-dir", str(mnist_dir), "--out-dir", str(out)]) == 0
    return out


@pytest.fixture
def copy_of(small_run, tmp_path):
    shutil.copytree(small_run, tmp_path / "out")
    return tmp_path / "out"


def methods_run(capsys, stdout):
    return [line for line in stdout.splitlines() if line.startswith(("Training the", "Fine-tuning"))]


# ------------------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("lr", ["10", "1", "1e6"])
def test_the_readme_divergence_example_fails_the_run(capsys, mnist_dir, tmp_path, lr):
    """`python main.py --quick --methods base --lr 10`: once exit 0 at 8.92 %, now a failed run, exit 1."""
    code, stdout, err = run(capsys, "--quick", "--methods", "base", "--lr", lr, "--data-dir", mnist_dir,
                            "--out-dir", tmp_path)
    assert code == 1 and "Base failed: " in stdout and f"lower --lr (now {float(lr):g})" in stdout
    assert "diverged at epoch" in stdout or "learned nothing" in stdout
    assert "the base model of seed 0 failed" in err
    run_ = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run_["status"] == "failed" and run_["reason"]


# --------------------------------------------------------------------------------- damaged saved models
def truncate(path):
    path.write_bytes(path.read_bytes()[:300])


def code_pickle(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"conv1.weight": Evil()}, path)


DAMAGE = {
    "truncated base": ("seed0/base_model.pt", truncate),
    "pickle with code as base": ("seed0/base_model.pt", code_pickle),
    "truncated adapter": ("seed0/adapters/lora_r8/adapter_model.safetensors", truncate),
    "deleted adapter config": ("seed0/adapters/lora_r8/adapter_config.json", lambda p: p.unlink()),
    "another adapter's tensors": ("seed0/adapters/lora_r8/adapter_model.safetensors",
                                  lambda p: p.write_bytes(p.read_bytes().replace(b"lora_A", b"lora_Z"))),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_resume_retrains_a_run_whose_saved_model_is_damaged(capsys, mnist_dir, copy_of, case):
    name, damage = DAMAGE[case]
    damage(copy_of / name)
    code, stdout, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and "Traceback" not in err
    assert str(copy_of / name.split("/adapter_")[0]) in stdout and "not kept, it is trained again" in stdout
    retrained = methods_run(capsys, stdout)
    assert len(retrained) == (2 if "base" in case else 1)  # a new base takes its adapters with it
    code, stdout, _ = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and stdout.count("kept.") == 2  # healed: the next --resume trusts both


def test_every_failure_to_load_a_model_is_one_sentence_naming_the_file(tmp_path):
    bad = tmp_path / "base_model.pt"
    for damage in (truncate, code_pickle):
        torch.save(main.CNN().state_dict(), bad)
        damage(bad)
        with pytest.raises(main.ModelFileError) as caught:
            main.load_plain(bad, "cpu")
        message = str(caught.value)
        assert message.startswith(f"{bad} cannot be read") and "weights_only=False" not in message
        assert "\n" not in message
    torch.save({"fc9.weight": torch.zeros(1)}, bad)
    with pytest.raises(main.ModelFileError, match="does not hold this CNN's weights"):
        main.load_plain(bad, "cpu")


# ----------------------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_that_imports_but_fails_when_called_skips_qlora_only(capsys, mnist_dir, copy_of, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(main, "import_bitsandbytes", lambda: types.SimpleNamespace(quantize_4bit=broken))
    code, stdout, _ = run(capsys, "--quick", "--methods", "qlora,lora", "--epochs", "1", "--finetune-epochs", "1",
                          "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and "QLoRA skipped: bitsandbytes' quantize_4bit failed (RuntimeError: no kernel image" in stdout
    runs = {r["method"]: r for r in json.loads((copy_of / "results.json").read_text())["runs"]}
    assert runs["qlora"]["status"] == "skipped" and runs["lora"]["status"] == "ok"


def test_results_md_does_not_name_a_bitsandbytes_that_cannot_be_used(monkeypatch):
    def unusable():
        raise main.BitsAndBytesUnavailable("bitsandbytes cannot be imported (OSError: libcudart.so)")
    monkeypatch.setattr(main, "import_bitsandbytes", unusable)
    assert main.environment(torch.device("cpu"))["bitsandbytes"] == "not usable"


# ------------------------------------------------------------------------------- one run per out-dir
def test_a_second_run_into_a_busy_out_dir_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("the second run went ahead"))
    lock = main.lock_out_dir(tmp_path)  # the first run, still going
    try:
        code, _, err = run(capsys, "--quick", "--out-dir", tmp_path)
    finally:
        lock.close()
    assert code == 2 and f"another run (process {os.getpid()}) is writing to {tmp_path}" in err


def test_the_lock_dies_with_its_process_even_by_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import main, pathlib, time; "
                               f"held = main.lock_out_dir(pathlib.Path({str(tmp_path)!r})); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(main.ConfigError, match=f"another run \\(process {holder.pid}\\)"):
            main.lock_out_dir(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up code of its own runs
        holder.wait()
    main.lock_out_dir(tmp_path).close()  # free again


def test_a_second_run_never_mixes_with_an_earlier_one(capsys, mnist_dir, copy_of):
    quick = (copy_of / "results.json").read_text()
    real = json.loads(quick)
    real["config"]["quick"] = False  # the earlier run as a real one: a quick run would be replaced
    (copy_of / "results.json").write_text(json.dumps(real))
    code, _, err = run(capsys, "--quick", "--methods", "base,dora", "--lr", "1e-3", "--data-dir", mnist_dir,
                       "--out-dir", copy_of)
    assert code == 2 and "already holds an earlier run's results" in err and "--resume" in err and "--overwrite" in err
    assert json.loads((copy_of / "results.json").read_text()) == real
    (copy_of / "results.json").write_text(quick)
    code, _, err = run(capsys, "--quick", "--methods", "dora", "--lr", "1e-3", "--resume", "--data-dir", mnist_dir,
                       "--out-dir", copy_of)
    assert code == 2 and "other settings (epochs, finetune_epochs, lr differ)" in err  # not on that base
    code, _, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--overwrite", "--data-dir", mnist_dir,
                     "--out-dir", copy_of)
    results = json.loads((copy_of / "results.json").read_text())
    assert code == 0 and [r["method"] for r in results["runs"]] == ["base"]
    assert not (copy_of / "seed0" / "adapters").exists()  # replaced, not mixed


def test_a_quick_run_is_replaced_without_asking_a_real_one_is_not(capsys, mnist_dir, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"config": {"quick": True}, "runs": []}))
    (tmp_path / "seed0").mkdir()
    code, stdout, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--data-dir", mnist_dir,
                          "--out-dir", tmp_path)
    assert code == 0 and f"Replacing the quick run (a smoke test) in {tmp_path}/" in stdout
    results = json.loads((tmp_path / "results.json").read_text())
    results["config"]["quick"] = False  # as a real run's results
    (tmp_path / "results.json").write_text(json.dumps(results))
    code, _, err = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--data-dir", mnist_dir,
                       "--out-dir", tmp_path)
    assert code == 2 and "already holds an earlier run's results" in err


def test_overwrite_is_refused_before_anything_is_removed_when_the_run_cannot_start(capsys, copy_of):
    code, _, err = run(capsys, "--methods", "lora", "--overwrite", "--out-dir", copy_of)
    assert code == 2 and "add base to --methods" in err and (copy_of / "seed0" / "base_model.pt").is_file()


def test_resume_with_fewer_methods_keeps_the_others(capsys, mnist_dir, copy_of):
    code, stdout, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--finetune-epochs", "1",
                          "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    results = json.loads((copy_of / "results.json").read_text())
    assert code == 0 and [r["method"] for r in results["other_runs"]] == ["lora"]
    code, stdout, _ = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and stdout.count("kept.") == 2 and not methods_run(capsys, stdout)


# ----------------------------------------------------------------------------------------- disk full
def test_a_full_disk_is_one_sentence_leaving_no_temporary_files(capsys, mnist_dir, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 100)  # a part written, then the device is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 54912 vs 54800")
    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1, used=1, free=0))
    code, _, err = run(capsys, *SMALL, "--data-dir", mnist_dir, "--out-dir", tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write base_model.pt in {tmp_path / 'seed0'} (no space left on the device)" in err
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "seed0" / "base_model.pt").exists()


def test_a_plot_that_cannot_be_written_leaves_no_empty_png(capsys, mnist_dir, copy_of, monkeypatch):
    import matplotlib.figure

    def enospc(self, fname, *a, **k):
        Path(fname).write_bytes(b"")
        raise OSError(28, "No space left on device")
    before = (copy_of / main.PLOT_FILES[0]).read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", enospc)
    code, _, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 1 and "cannot write training_loss_comparison.png" in err and "No space left on device" in err
    assert (copy_of / main.PLOT_FILES[0]).read_bytes() == before and not list(copy_of.rglob("*.tmp"))
    assert json.loads((copy_of / "results.json").read_text())["runs"]  # nothing finished lost


# ----------------------------------------------------------------------------------- malformed results
MALFORMED = {
    "runs as strings": lambda r: {**r, "runs": ["base", "lora"]},
    "runs null": lambda r: {**r, "runs": None},
    "config a list": lambda r: {**r, "config": [1, 2]},
    "a run without test_acc": lambda r: {**r, "runs": [{k: v for k, v in r["runs"][0].items() if k != "test_acc"}]},
    "a run without history": lambda r: {**r, "runs": [{k: v for k, v in r["runs"][0].items() if k != "history"}]},
    "a list": lambda r: [r],
    "a grid run without val_acc": lambda r: {**r, "lr_grid": [{"method": "lora", "seed": 0, "rank": 8, "lr": 1e-3,
                                                                "status": "ok", "val_loss": 0.1}]},
    "other_runs a dict": lambda r: {**r, "other_runs": {}},
}


@pytest.mark.parametrize("case", list(MALFORMED) + ["a directory", "not JSON"])
def test_a_malformed_results_file_gets_the_clear_message(capsys, mnist_dir, copy_of, case):
    path = copy_of / "results.json"
    if case == "a directory":
        path.unlink()
        path.mkdir()
    elif case == "not JSON":
        path.write_text("{ half a file")
    else:
        path.write_text(json.dumps(MALFORMED[case](json.loads(path.read_text()))))
    code, _, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 2 and f"{path} is not a results file of this script" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------- smaller cases
def test_unreadable_mnist_is_one_sentence(capsys, mnist_dir, tmp_path, monkeypatch):
    real = Path.read_bytes

    def denied(self):
        if self.name == "train-labels-idx1-ubyte":
            raise PermissionError(13, "Permission denied")
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", denied)
    code, _, err = run(capsys, "--quick", "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 2 and "train-labels-idx1-ubyte cannot be read (Permission denied)" in err


def test_ctrl_c_during_start_up_is_a_sentence(capsys, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "load_dataset", interrupted)
    code, _, err = run(capsys, "--quick", "--out-dir", tmp_path)
    assert code == 130 and "Interrupted during start-up: nothing had been trained yet." in err


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interruption_while_plotting_is_a_sentence(capsys, mnist_dir, copy_of, monkeypatch, how):
    def interrupted(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "plot_results", interrupted)
    code, _, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 130 and "Interrupted during plotting (the results themselves are saved)" in err
    assert len(json.loads((copy_of / "results.json").read_text())["runs"]) == 2
