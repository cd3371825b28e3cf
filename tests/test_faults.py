"""Faults and hostile files: each case the README's "When things go wrong" promises, reproduced."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

import main
from conftest import ROOT, run

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
@pytest.mark.parametrize("lr", ["10", "1"])
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


@pytest.mark.usefixtures("no_plots")
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
@pytest.mark.usefixtures("no_plots")
def test_bitsandbytes_that_imports_but_fails_when_called_skips_qlora_only(capsys, mnist_dir, copy_of, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(main, "bitsandbytes", lambda: types.SimpleNamespace(quantize_4bit=broken))
    code, stdout, _ = run(capsys, "--quick", "--methods", "qlora,lora", "--epochs", "1", "--finetune-epochs", "1",
                          "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and "QLoRA skipped: bitsandbytes' quantize_4bit failed (RuntimeError: no kernel image" in stdout
    runs = {r["method"]: r for r in json.loads((copy_of / "results.json").read_text())["runs"]}
    assert runs["qlora"]["status"] == "skipped" and runs["lora"]["status"] == "ok"


def test_results_md_does_not_name_a_bitsandbytes_that_cannot_be_used(monkeypatch):
    def unusable():
        raise main.BitsAndBytesUnavailable("bitsandbytes cannot be imported (OSError: libcudart.so)")
    monkeypatch.setattr(main, "bitsandbytes", unusable)
    assert main.environment(torch.device("cpu"), ["base", "qlora"])["bitsandbytes"] == "not usable"
    assert main.environment(torch.device("cpu"), ["base", "lora"])["bitsandbytes"] == "not used"  # nor imported


# ------------------------------------------------------------------------------- one run per out-dir
def test_a_second_run_into_a_busy_out_dir_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("the second run went ahead"))
    lock = main.lock_out_dir(tmp_path)  # the first run, still going
    try:
        code, _, err = run(capsys, "--quick", "--out-dir", tmp_path)
    finally:
        lock.release()
    assert code == 2 and f"another run is writing to {tmp_path}: wait for it to finish" in err


def test_the_lock_dies_with_its_process_even_by_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import main, pathlib, time; "
                               f"held = main.lock_out_dir(pathlib.Path({str(tmp_path)!r})); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(main.ConfigError, match="another run is writing to"):
            main.lock_out_dir(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up code of its own runs
        holder.wait()
    main.lock_out_dir(tmp_path).release()  # free again


def tree(folder):
    """{path: bytes} of every file under `folder` but a lock: what "left byte-identical" compares."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("argv", [["--quick"], ["--memory-batches", "1"], ["--quick", "--resume"],
                                  ["--replot", "elsewhere"]])
def test_a_folder_holding_a_users_file_is_refused_and_left_byte_identical(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("the run went ahead"))
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "mine.md").write_text("the user's")
    before = tree(out)
    code, _, err = run(capsys, *argv, "--out-dir", out)
    assert code == 2 and err.count("\n") == 1 and f"{out} already holds other files (notes)" in err
    assert f"use --out-dir {tmp_path / 'out-2'}" in err  # a free folder, named
    assert tree(out) == before and not (out / ".lock").exists()  # not even a lock file of ours


@pytest.mark.parametrize("aim", ["the run", "its parent", ". inside it", "a replot into its parent"])
def test_a_finished_run_is_never_altered_by_a_run_or_a_replot_aimed_at_it(capsys, mnist_dir, copy_of, monkeypatch,
                                                                           aim):
    before = tree(copy_of)
    monkeypatch.chdir(copy_of)
    target = {"the run": copy_of, "its parent": copy_of.parent, ". inside it": ".",
              "a replot into its parent": copy_of.parent}[aim]
    argv = ["--replot", copy_of] if aim.startswith("a replot") else [*SMALL, "--data-dir", mnist_dir]
    code, _, err = run(capsys, *argv, "--out-dir", target)
    assert code == 2 and err.count("\n") == 1 and "a run writes only into a new or empty folder" in err
    if aim in ("the run", ". inside it"):
        assert "holds a run's results (--resume continues that run)" in err
    assert tree(copy_of) == before


def test_a_replot_into_the_run_rewrites_only_its_figures_and_results_md(capsys, copy_of):
    before = tree(copy_of)
    (copy_of / "results.md").write_text("stale")
    code, stdout, _ = run(capsys, "--replot", copy_of)
    after = tree(copy_of)
    assert code == 0 and f"in {copy_of}/" in stdout and after[Path("results.md")] == before[Path("results.md")]
    assert {p: b for p, b in after.items() if p.suffix != ".png"} == {p: b for p, b in before.items()
                                                                       if p.suffix != ".png"}  # results.json, models


@pytest.mark.usefixtures("no_plots")
def test_resume_with_fewer_methods_keeps_the_others(capsys, mnist_dir, copy_of):
    code, stdout, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--finetune-epochs", "1",
                          "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    results = json.loads((copy_of / "results.json").read_text())
    assert code == 0 and [r["method"] for r in results["other_runs"]] == ["lora"]
    code, stdout, _ = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and stdout.count("kept.") == 2 and not methods_run(capsys, stdout)


# ----------------------------------------------------------------------------------------- disk full
def test_a_full_disk_is_one_sentence_leaving_no_temporary_files(capsys, mnist_dir, tmp_path, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def onto_a_full_device(*a, **k):  # the temporary file is made, and every write to it finds the device full
        fd, name = real_mkstemp(*a, **k)
        os.close(fd)
        return (os.open("/dev/full", os.O_WRONLY) if "base_model" in name else os.open(name, os.O_WRONLY)), name
    monkeypatch.setattr(tempfile, "mkstemp", onto_a_full_device)
    code, _, err = run(capsys, *SMALL, "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write base_model.pt in {tmp_path / 'seed0'} (No space left on device)" in err
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "seed0" / "base_model.pt").exists()


def test_a_plot_that_cannot_be_written_leaves_no_empty_png(capsys, mnist_dir, copy_of, monkeypatch):
    import matplotlib.figure

    def enospc(self, file, *a, **k):
        file.write(b"")  # the PNG begun in its temporary file, then the device is full
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
            raise PermissionError(13, "Permission denied", str(self))  # as the system says it, naming the file
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", denied)
    code, _, err = run(capsys, "--quick", "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot use {mnist_dir / 'MNIST' / 'raw' / 'train-labels-idx1-ubyte'} (Permission denied)" in err


def test_ctrl_c_during_start_up_is_a_sentence(capsys, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "load_dataset", interrupted)
    code, _, err = run(capsys, "--quick", "--out-dir", tmp_path)
    assert code == 130 and err.strip() == (f"Interrupted: every run finished before it is kept in "
                                           f"{tmp_path / 'results.json'}; run the same command with --resume to continue.")


def test_an_interruption_while_plotting_is_a_sentence(capsys, mnist_dir, copy_of, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "plot_results", interrupted)
    code, _, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 130 and "Interrupted: every run finished before it is kept in" in err
    assert len(json.loads((copy_of / "results.json").read_text())["runs"]) == 2


def victim_of(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("a file of the user's, outside the out-dir")
    return victim


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_a_lock_that_is_not_a_regular_file_is_refused_or_harmless(capsys, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("the run went ahead"))
    victim, out = victim_of(tmp_path), tmp_path / "out"
    out.mkdir()
    {"symlink": lambda p: p.symlink_to(victim), "directory": lambda p: p.mkdir(), "fifo": os.mkfifo}[kind](out / ".lock")
    if kind == "fifo":  # a FIFO locks like a file (opened without blocking): the run goes ahead, nothing hangs
        with pytest.raises(pytest.fail.Exception, match="the run went ahead"):
            run(capsys, "--quick", "--out-dir", out)
        return
    code, _, err = run(capsys, "--quick", "--out-dir", out)
    assert code == 2 and err.startswith("error: cannot use ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(out / ".lock") in err and victim.read_text() == "a file of the user's, outside the out-dir"


def test_a_lock_that_cannot_be_opened_is_one_sentence(capsys, tmp_path, monkeypatch):
    """A read-only .lock (as a user other than root sees it), simulated: root may open any file."""
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("the run went ahead"))
    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run(capsys, "--quick", "--out-dir", tmp_path)
    assert code == 2 and f"cannot use {tmp_path / '.lock'} (Permission denied)" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "100000000"], "--seeds: must be between 1 and 1000"),
    (["--lrs", ",".join(f"{k}e-4" for k in range(1, 40))], "--lrs: holds 39 values: at most 20"),
    (["--epochs", "100000000"], "--epochs: must be between 1 and 10000"),
    (["--lr", "11"], "--lr must be a rate above 0 and at most 10 (got 11.0)"),
    (["--lrs", "1e-3,nan"], "--lrs: must be at least 0 (got nan)"),
    (["--lrs", "0,1e-3"], "--lrs must be a rate above 0 and at most 10 (got 0.0)"),
    (["--alpha", "1e5"], "--alpha must be above 0 and at most 10000 (got 100000.0)"),
    (["--budgets", ",".join(map(str, range(1, 5001)))], "--budgets: holds 5000 values: at most 10"),
    (["--memory-batches", "1,100000"], "--memory-batches: must be between 1 and 4096 (got 100000)"),
    (["--width", "64"], "--width: must be between 1 and 16 (got 64)"),
    (["--methods", "base,lora", "--dyn-beta", "2"], "--dyn-beta: must be between 0 and 0.999 (got 2.0)"),  # not run, still kept
    (["--memory-batches", "8", "--resume"], "--memory-batches runs the memory sweep, which trains nothing"),
])
def test_bounds_and_empty_values_are_one_sentence_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    out = [] if "--out-dir" in argv else ["--out-dir", tmp_path]
    code, _, err = run(capsys, *argv, *out)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_rate_out_of_bounds_in_the_table_is_caught(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(main.METHODS, "dora", main.METHODS["dora"]._replace(lr=20.0))
    code, _, err = run(capsys, "--out-dir", tmp_path)
    assert code == 2 and "METHODS['dora'].lr must be a rate above 0 and at most 10 (got 20.0)" in err


def without(record, key):
    return {k: v for k, v in record.items() if k != key}


UNCHECKED = {  # fields the code reads that the results-file check let through
    "a kept run without frozen_weight_bytes": lambda r: {**r, "runs": [r["runs"][0], without(r["runs"][1], "frozen_weight_bytes")]},
    "a kept run without frozen_weight_fp32_bytes": lambda r: {
        **r, "runs": [r["runs"][0], without(r["runs"][1], "frozen_weight_fp32_bytes")]},
    "a failed grid run without lr": lambda r: {**r, "lr_grid": [{"method": "lora", "seed": 0, "rank": 8, "status": "failed",
                                                                  "reason": "diverged"}]},
    "results of another format": lambda r: {**r, "format": 1},
}


@pytest.mark.parametrize("case", list(UNCHECKED) + ["nested 100,000 deep"])
def test_every_field_the_code_reads_is_checked(capsys, mnist_dir, copy_of, case):
    path = copy_of / "results.json"
    if case == "nested 100,000 deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path.write_text(json.dumps(UNCHECKED[case](json.loads(path.read_text()))))
    code, _, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 2 and f"{path} is not a results file of this script" in err and err.count("\n") == 1


def permission_denied_under(monkeypatch, folder):
    """Simulate a folder without search permission (root, who runs CI, may search any folder)."""
    real_stat = Path.stat

    def stat(self, *a, **k):
        if str(self).startswith(str(folder) + os.sep):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *a, **k)
    monkeypatch.setattr(Path, "stat", stat)


def test_a_data_folder_without_search_permission_is_one_sentence(capsys, mnist_dir, tmp_path, monkeypatch):
    permission_denied_under(monkeypatch, mnist_dir / "MNIST" / "raw")
    code, _, err = run(capsys, "--quick", "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "Permission denied" in err and str(mnist_dir / "MNIST" / "raw") in err


@pytest.mark.usefixtures("no_plots")
def test_resume_with_an_unsearchable_seed_folder_is_one_sentence(capsys, mnist_dir, copy_of, monkeypatch):
    permission_denied_under(monkeypatch, copy_of / "seed0")
    code, stdout, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code in (1, 2) and err.count("\n") == 1 and "Permission denied" in err and "Traceback" not in err


def test_the_first_write_error_is_the_one_reported(capsys, mnist_dir, tmp_path, monkeypatch):
    """The base saved, then the disk full: the adapter cannot be written, nor then the plots. The message
    names the adapter file, the first failure, and mentions the plots after it."""
    real_replace = os.replace

    def disk_full_for_adapters_and_plots(src, dst, *a, **k):
        if str(dst).endswith((".safetensors", ".png")):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", disk_full_for_adapters_and_plots)
    code, _, err = run(capsys, *SMALL, "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: cannot write adapter_model.safetensors")
    assert "The plots were not written either: cannot write" in err


def test_a_slow_run_that_learned_nothing_is_not_told_to_lower_the_rate(capsys, mnist_dir, tmp_path):
    code, stdout, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--lr", "1e-7",
                          "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 1 and "learned nothing" in stdout
    assert "lower --lr" not in stdout and "raise --lr (now 1e-07) or the epoch budget" in stdout


def test_resume_into_a_folder_without_results_finds_nothing_to_keep(tmp_path):
    assert main.earlier_records(tmp_path, {}, []) == ({}, {})  # nothing to trust, nothing carried along


# ------------------------------------------------------------------ this round's hostile cases (issue 32)
@pytest.mark.usefixtures("no_plots")
def test_the_largest_rate_allowed_diverges_as_a_recorded_failure_not_a_traceback(capsys, mnist_dir, tmp_path):
    code, stdout, err = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--lr", "10",
                            "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 1 and "Traceback" not in err and "Base failed: " in stdout
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["status"] == "failed"


@pytest.mark.usefixtures("no_plots")
def test_a_run_whose_adapters_never_moved_is_a_recorded_failure(capsys, mnist_dir, tmp_path, monkeypatch):
    """LoRA's updates vanish (its rate 0 inside train: the base trains as usual), so its adapters never trained:
    a failure with its reason, not a result at the base's accuracy."""
    real_train = main.train
    monkeypatch.setattr(main, "train", lambda model, data, lr, *a, **k: real_train(
        model, data, 0.0 if main.adapter_layers(model) else lr, *a, **k))
    code, stdout, _ = run(capsys, "--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1",
                          "--data-dir", mnist_dir, "--out-dir", tmp_path)
    base, lora = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert code == 1 and base["status"] == "ok" and lora["status"] == "failed"
    assert lora["reason"] == "its adapters never moved from their start: every update vanished"


@pytest.mark.usefixtures("no_plots")
def test_a_changed_adapter_folder_is_trained_again_on_resume_then_trusted(capsys, mnist_dir, copy_of):
    folder = copy_of / "seed0" / "adapters" / "lora_r8"
    (folder / "notes").mkdir()  # not the folder that was saved: trained again (the subfolder is left where it is)
    code, stdout, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and "Traceback" not in err and "not kept, it is trained again" in stdout
    assert len(methods_run(capsys, stdout)) == 1
    code, stdout, _ = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and stdout.count("kept.") == 2 and (folder / "notes").is_dir()  # healed: trusted from then on
