"""Faults and hostile files: each case the README's "When things go wrong" promises, reproduced."""
import copy
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
from conftest import ROOT, adapt, run

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


@pytest.mark.usefixtures("no_plots_or_latency")
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
@pytest.mark.usefixtures("no_plots_or_latency")
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


@pytest.mark.usefixtures("no_plots_or_latency")
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


@pytest.mark.usefixtures("no_plots_or_latency")
def test_a_quick_run_is_replaced_without_asking_a_real_one_is_not(capsys, mnist_dir, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"config": {"quick": True}, "runs": []}))
    (tmp_path / "seed0").mkdir()
    code, stdout, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--data-dir", mnist_dir,
                          "--out-dir", tmp_path)
    assert code == 0 and f"Moved the quick run (a smoke test) in {tmp_path}/ aside, to {tmp_path}.before-" in stdout
    results = json.loads((tmp_path / "results.json").read_text())
    results["config"]["quick"] = False  # as a real run's results
    (tmp_path / "results.json").write_text(json.dumps(results))
    code, _, err = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--data-dir", mnist_dir,
                       "--out-dir", tmp_path)
    assert code == 2 and "already holds an earlier run's results" in err


def test_overwrite_is_refused_before_anything_is_removed_when_the_run_cannot_start(capsys, copy_of):
    code, _, err = run(capsys, "--methods", "lora", "--overwrite", "--out-dir", copy_of)
    assert code == 2 and "add base to --methods" in err and (copy_of / "seed0" / "base_model.pt").is_file()


@pytest.mark.usefixtures("no_plots_or_latency")
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


# ====================================================================== the user's files (issue 20)
def as_real_run(out):
    """Mark an out-dir's results as a real run's: a quick run's are replaced without asking."""
    results = json.loads((out / "results.json").read_text())
    results["config"]["quick"] = False
    (out / "results.json").write_text(json.dumps(results))


USERS_FILES = {"seed_photos/IMG_0001.jpg": b"precious", "seedbank/notes.txt": b"mine", "seeds.csv": b"1,2,3",
               "seed0/my_notes.txt": b"mine too", "seed0/adapters/lora_r8/README": b"my words on this adapter"}


def plant(out, files=USERS_FILES):
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)


def untouched(out, files=USERS_FILES):
    return all((out / name).is_file() and (out / name).read_bytes() == content for name, content in files.items())


@pytest.mark.usefixtures("no_plots_or_latency")
@pytest.mark.parametrize("how", ["--overwrite", "a quick run replaced"])
def test_a_replaced_run_is_moved_aside_with_the_users_files_nothing_deleted(capsys, mnist_dir, copy_of, how):
    if how == "--overwrite":
        as_real_run(copy_of)
    plant(copy_of)
    before = {p.relative_to(copy_of): p.read_bytes() for p in copy_of.rglob("*") if p.is_file() and p.name != ".lock"}
    flags = ["--overwrite"] if how == "--overwrite" else []
    code, stdout, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", *flags, "--data-dir", mnist_dir,
                          "--out-dir", copy_of)
    aside = next(copy_of.parent.glob(f"{copy_of.name}.before-*"))
    assert code == 0 and f"aside, to {aside}/" in stdout
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before  # all of it
    assert untouched(aside)  # the user's files among it, as they were
    assert [r["method"] for r in json.loads((copy_of / "results.json").read_text())["runs"]] == ["base"]


def damaged_data(tmp_path, mnist_dir):
    raw = tmp_path / "damaged" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_dir / "MNIST" / "raw").iterdir():
        (raw / f.name).symlink_to(f)
    victim = raw / "t10k-labels-idx1-ubyte"
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[:-10])
    return tmp_path / "damaged"


@pytest.mark.parametrize("data", ["missing", "damaged"])
def test_overwrite_removes_nothing_when_the_data_stops_the_run(capsys, mnist_dir, copy_of, tmp_path, data):
    as_real_run(copy_of)
    before = {p: p.read_bytes() for p in copy_of.rglob("*") if p.is_file()}
    data_dir = tmp_path / "no_data" if data == "missing" else damaged_data(tmp_path, mnist_dir)
    code, stdout, err = run(capsys, "--quick", "--methods", "base", "--overwrite", "--data-dir", data_dir,
                            "--out-dir", copy_of)
    assert code == 2 and ("is missing from" in err or "is damaged" in err)
    assert "Replacing" not in stdout and (data == "damaged" or not data_dir.exists())  # no mistyped folder made
    assert {p: p.read_bytes() for p in copy_of.rglob("*") if p.is_file() and p.name != ".lock"} == {
        p: b for p, b in before.items() if p.name != ".lock"}


def victim_of(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("a file of the user's, outside the out-dir")
    return victim


def test_no_write_follows_a_symlink_planted_in_the_out_dir(capsys, mnist_dir, tmp_path):
    victim, out = victim_of(tmp_path), tmp_path / "out"
    (out / "seed0").mkdir(parents=True)
    for name in (".results.json.tmp", ".results.md.tmp", f".{main.PLOT_FILES[0]}.tmp",
                 "seed0/.base_model.pt.tmp"):
        (out / name).symlink_to(victim)
    code, _, _ = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 0 and victim.read_text() == "a file of the user's, outside the out-dir"
    assert (out / "results.json").is_file() and not (out / "results.json").is_symlink()


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
    (["--lr", "1e39"], "--lr must be a positive number no larger than 3.4e+37"),
    (["--lrs", "1e-3,1e39"], "--lrs must be a positive number no larger than 3.4e+37"),
    (["--alpha", "1e39"], "--alpha must be a positive number no larger than float32's largest, 3.4e+38"),
    (["--out-dir", ""], "--out-dir must name a folder"),
    (["--data-dir", ""], "--data-dir must name a folder"),
    (["--lrs", " , "], "--lrs: names no value"),
    (["--ranks", " ,"], "--ranks: names no value"),
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


def test_a_rate_beyond_float32_in_the_table_is_caught(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(main.METHODS, "dora", main.METHODS["dora"]._replace(lr=1e39))
    code, _, err = run(capsys, "--out-dir", tmp_path)
    assert code == 2 and "METHODS['dora'].lr must be a positive number no larger than 3.4e+37" in err


def without(record, key):
    return {k: v for k, v in record.items() if k != key}


UNCHECKED = {  # fields the code reads that the results-file check let through
    "a kept run without cuda_peak_bytes": lambda r: {**r, "runs": [without(r["runs"][0], "cuda_peak_bytes")] + r["runs"][1:]},
    "a kept run without frozen_weight_bytes": lambda r: {**r, "runs": [r["runs"][0], without(r["runs"][1], "frozen_weight_bytes")]},
    "a kept run without frozen_weight_fp32_bytes": lambda r: {
        **r, "runs": [r["runs"][0], without(r["runs"][1], "frozen_weight_fp32_bytes")]},
    "a failed grid run without lr": lambda r: {**r, "lr_grid": [{"method": "lora", "seed": 0, "rank": 8, "status": "failed",
                                                                  "reason": "diverged"}]},
    "NaN as an accuracy": lambda r: {**r, "runs": [{**r["runs"][0], "test_acc": float("nan")}] + r["runs"][1:]},
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


@pytest.mark.usefixtures("no_plots_or_latency")
def test_an_adapter_folder_of_another_method_is_not_trusted_even_with_its_checksum(capsys, mnist_dir, copy_of):
    folder = copy_of / "seed0" / "adapters" / "lora_r8"
    info = json.loads((folder / "training_info.json").read_text())
    (folder / "training_info.json").write_text(json.dumps({**info, "method": "dora"}))
    results = json.loads((copy_of / "results.json").read_text())
    results["runs"][1]["file_sha256"] = main.file_digest(folder)  # the checksum made to match
    (copy_of / "results.json").write_text(json.dumps(results))
    code, stdout, _ = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and "was written for DoRA (weight-decomposed), not LoRA" in stdout and "not kept, it is trained again" in stdout
    assert len(methods_run(capsys, stdout)) == 1


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


@pytest.mark.usefixtures("no_plots_or_latency")
def test_resume_with_an_unsearchable_seed_folder_is_one_sentence(capsys, mnist_dir, copy_of, monkeypatch):
    permission_denied_under(monkeypatch, copy_of / "seed0")
    code, stdout, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code in (1, 2) and err.count("\n") == 1 and "Permission denied" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["symlink", "file"])
@pytest.mark.parametrize("flag", ["--overwrite", "--resume", "fresh"])
def test_a_seed_folder_that_is_not_a_folder_is_refused_before_anything_is_removed(capsys, tmp_path, mnist_dir,
                                                                                   small_run, kind, flag):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    shutil.copytree(small_run, elsewhere)
    out.mkdir()
    if flag != "fresh":
        shutil.copy2(small_run / "results.json", out / "results.json")
        as_real_run(out)
    (out / "seed0").symlink_to(elsewhere / "seed0") if kind == "symlink" else (out / "seed0").write_text("mine")
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    code, _, err = run(capsys, *SMALL, *([flag] if flag != "fresh" else []), "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 2 and f"{out / 'seed0'} is not a folder" in err and err.count("\n") == 1
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before
    assert (out / "seed0").is_symlink() if kind == "symlink" else (out / "seed0").read_text() == "mine"


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
@pytest.mark.parametrize("argv", [["--methods", "base", "--lr", "1e38"], ["--methods", "base", "--lr", "5e37"],
                                  ["--methods", "base,head,lora", "--lrs", "1e-3,5e37"],
                                  ["--methods", "base,head,lora", "--lrs", "1e-3,5e37", "--resume"]])
def test_a_rate_adams_first_step_cannot_hold_is_one_sentence_before_any_training(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, _, err = run(capsys, *argv, "--out-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "no larger than 3.4e+37 (Adam's first step divides it by 0.1" in err


@pytest.mark.usefixtures("no_plots_or_latency")
def test_the_largest_rate_allowed_diverges_as_a_recorded_failure_not_a_traceback(capsys, mnist_dir, tmp_path):
    code, stdout, err = run(capsys, "--quick", "--methods", "base", "--epochs", "1", "--lr", "3e37",
                            "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert code == 1 and "Traceback" not in err and "Base failed: diverged at epoch 1" in stdout
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["status"] == "failed"


@pytest.mark.parametrize("edit", [{"conv1": -3}, {"fc1": 10**9}, {"conv2": "4"}])
def test_an_edited_rank_pattern_is_one_sentence_not_a_crash_or_a_huge_allocation(tmp_path, edit):
    torch.manual_seed(0)
    base = main.CNN()
    torch.save(base.state_dict(), tmp_path / "base_model.pt")
    model = adapt(copy.deepcopy(base), "dyndora", rank=4)
    folder = main.save_adapter(model, "dyndora", 4, main.parse_args([]), tmp_path / "dyndora_r4")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] |= edit
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(main.ModelFileError, match="is not a LoRA config of this CNN .* is not the rank of its saved"):
        main.load_adapter(tmp_path / "base_model.pt", folder)


@pytest.mark.usefixtures("no_plots_or_latency")
@pytest.mark.parametrize("case", ["method a list", "a folder inside"])
def test_a_tampered_adapter_folder_is_trained_again_on_every_resume_not_a_crash(capsys, mnist_dir, copy_of, case):
    folder = copy_of / "seed0" / "adapters" / "lora_r8"
    if case == "method a list":
        info = json.loads((folder / "training_info.json").read_text())
        (folder / "training_info.json").write_text(json.dumps({**info, "method": ["lora"]}))
        results = json.loads((copy_of / "results.json").read_text())
        results["runs"][1]["file_sha256"] = main.file_digest(folder)  # the checksum made to match
        (copy_of / "results.json").write_text(json.dumps(results))
    else:  # not the folder that was saved: trained again (the subfolder, maybe a user's, is left where it is)
        (folder / "notes").mkdir()
    code, stdout, err = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and "Traceback" not in err and "not kept, it is trained again" in stdout
    assert len(methods_run(capsys, stdout)) == 1
    code, stdout, _ = run(capsys, *SMALL, "--resume", "--data-dir", mnist_dir, "--out-dir", copy_of)
    assert code == 0 and stdout.count("kept.") == 2  # healed: trusted from then on
    assert case == "method a list" or (folder / "notes").is_dir()
