"""main(): bad input fails fast and clearly; the quick run writes every output; faults and interruptions
lose nothing that finished."""
import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from conftest import ROOT, run


# ----------------------------------------------------------------------------------------- bad input
BAD = [
    (["--rank", "0"], "--rank must be between 1 and 16"),
    (["--rank", "17"], "--rank must be between 1 and 16"),
    (["--rank", "11", "--no-train-head"], "--rank must be between 1 and 10"),
    (["--alpha", "0"], "--alpha must be above 0 and at most 10000 (got 0.0)"),
    (["--alpha", "inf"], "--alpha must be above 0 and at most 10000 (got inf)"),
    (["--lr=-0.001"], "--lr must be a rate above 0 and at most 10 (got -0.001)"),
    (["--lr", "inf"], "--lr must be a rate above 0 and at most 10 (got inf)"),
    (["--lr", "nan"], "--lr must be a rate above 0 and at most 10 (got nan)"),
    (["--seed", "92233720368547"], "--seed: must be between 0 and 4294966296 (got 92233720368547)"),
    (["--seed=-1"], "--seed: must be between 0 and"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--epochs", "0"], "--epochs: must be between 1 and 10000"),
    (["--finetune-epochs", "0"], "--finetune-epochs: must be between 1 and 10000"),
    (["--patience", "-1"], "--patience: must be at least 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--methods", "base,lorra"], f"unknown method(s) lorra: choose from {', '.join(['base', *main.METHODS])}"),
    (["--methods", "lora,base"], "base must come first in --methods"),
    (["--seeds", "0"], "--seeds: must be between 1 and 1000"),
    (["--task", "upside-down"], "unknown --task 'upside-down': choose from mnist, rotated, fashion"),
    (["--ranks", "1,2,x"], "--ranks: whole numbers expected, separated by commas (got '1,2,x')"),
    (["--ranks", "4,17"], "--ranks must be between 1 and 16"),
    (["--dyn-prune-from", "0.6"], "--dyn-prune-from (0.6) must come before --dyn-prune-until (0.5)"),
    (["--dyn-components", "0.5"], "--dyn-components: must be between 1 and 10 (got 0.5)"),
    (["--dyn-beta", "nan"], "--dyn-beta: must be between 0 and 0.999 (got nan)"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_flags_fail_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, out, err = run(capsys, *argv, "--out-dir", tmp_path)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("name, value, message", [
    ("rank", 0, "--rank must be between 1 and 16"), ("lr", 0.0, "--lr must be a rate above 0 and at most 10"),
    ("patience", -2, "--patience: must be at least 0"), ("methods", "base,ia3", "unknown method(s) ia3"),
    ("dropout", 1.5, "--dropout must be in [0, 1)"), ("batch_size", 0, "--batch-size: must be at least 1"),
    ("seeds", 0, "--seeds: must be between 1 and 1000"), ("task", "mnits", "unknown --task 'mnits'"),
    ("ranks", "0,8", "--ranks: must be at least 1 (got 0)"), ("device", "tpu", "unknown --device 'tpu'")])
def test_bad_defaults_are_caught_like_flags(capsys, tmp_path, monkeypatch, name, value, message):
    monkeypatch.setitem(main.SETTINGS, name, (value, *main.SETTINGS[name][1:]))
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, _, err = run(capsys, "--out-dir", tmp_path)
    assert code == 2 and message in err


def test_every_setting_is_a_flag_with_its_default_and_help_says_so(capsys):
    args = vars(main.parse_args([]))
    args["methods"] = ",".join(args["methods"])  # parse_args splits the list
    for name in ("lrs", "ranks", "budgets", "memory_batches", "memory_widths"):  # comma lists, parsed
        args[name] = ",".join(map(str, args[name]))
    assert {name: args[name] for name in main.SETTINGS} == {n: d for n, (d, *_) in main.SETTINGS.items()}
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help: compare without the breaks
    for name, (default, kind, meaning) in main.SETTINGS.items():
        flag = "--" + name.replace("_", "-") + (" , --no-" + name.replace("_", "-") if kind is bool else "")
        assert flag.replace(" ,", ",") in shown and " ".join(meaning.split()) in shown, name


def test_a_variants_setting_no_run_can_honour_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(main.METHODS, "lora_r4", main.METHODS["lora_bias"]._replace(settings={"rank": 4}))
    code, _, err = run(capsys, "--out-dir", tmp_path)
    assert code == 2 and "METHODS['lora_r4'] sets rank, which a row cannot change: a row may set alpha" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    code, _, err = run(capsys, "--device", "cuda", "--out-dir", tmp_path)
    assert code == 2 and "no CUDA device is available" in err


def test_out_dir_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run(capsys, "--out-dir", blocker / "plots")
    assert code == 2 and "cannot write to --out-dir" in err


def test_adapters_without_a_base_need_one_from_this_run_or_a_resumed_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, _, err = run(capsys, "--methods", "lora", "--out-dir", tmp_path)
    assert code == 2 and "add base to --methods, or --resume" in err and "base of seed(s) 0" in err


def test_missing_data_is_one_sentence_without_traceback(tmp_path):
    """As a user sees it, in a fresh process with no network: exit code 2, a message, no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--quick", "--data-dir", str(tmp_path / "none"),
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "MNIST is missing from" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr


# --------------------------------------------------------------------------------- the quick run
def git(repo, *argv):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, mnist_dir):
    """The README's first command with --quick (every method, the default out-dir; on the tests' 2,000 training
    images, conftest.py), run in a fresh copy of the repository as committed; shared by the tests below."""
    repo = tmp_path_factory.mktemp("clone") / "repo"
    for name in git(ROOT, "ls-files").splitlines():
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "copy")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        code = main.main(["--quick", "--data-dir", str(mnist_dir)])
    out, = (repo / "runs").iterdir()  # a new folder of its own, named after the time
    return code, out, repo


def test_a_run_with_the_default_out_dir_changes_no_committed_file(quick_run):
    code, out, repo = quick_run
    assert code == 0 and (out / "results.json").is_file() and (out / main.PLOT_FILES[2]).is_file()
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""  # nothing changed, nothing unignored
    assert out.parent == repo / "runs" and out.name.endswith("-quick")
    code = json.loads((out / "results.json").read_text())["code"]  # the code it ran (this process's main.py)
    edited = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "main.py"]).returncode != 0
    assert code == {"main_py_sha256": main.file_digest(ROOT / "main.py"), "main_py_edited": edited,
                    "commit": git(ROOT, "rev-parse", "HEAD").strip()}


def test_no_readme_command_writes_into_a_committed_folder():
    tracked = {Path(name).parent for name in git(ROOT, "ls-files").splitlines()}
    commands = [line for line in (ROOT / "README.md").read_text().splitlines() if "python main.py" in line]
    assert len(commands) >= 3
    for command in commands:
        argv = command.split("python main.py", 1)[1].split("#")[0].split()
        out = Path(argv[argv.index("--out-dir") + 1]) if "--out-dir" in argv else Path("runs")
        assert out not in tracked and out.parts[0] == "runs", command


def runs_by_method(results, seed=0):
    return {r["method"]: r for r in results["runs"] if r["seed"] == seed and r["rank"] in (None, results["config"]["rank"])}


def test_quick_run_writes_every_output_with_sane_numbers(quick_run):
    code, out, _ = quick_run
    assert code == 0
    for name in main.PLOT_FILES:
        assert (out / name).stat().st_size > 10_000, name
    assert not (out / main.SWEEP_PLOT).exists()  # no --ranks, no sweep
    results = main.add_summary(json.loads((out / "results.json").read_text()))
    runs = runs_by_method(results)
    assert [(r["method"], r["seed"], r["rank"]) for r in results["runs"]] == [("base", 0, None)] + [
        (m, 0, 8 if main.adapter_class(m) else None) for m in main.COMPARED]
    assert results["config"]["rank"] == main.SETTINGS["rank"][0] and results["environment"]["torch"] == torch.__version__
    assert results["config"]["task"] == "mnist" and results["seeds"] == [0] and results["rank_sweep"] == {}
    base = runs["base"]
    assert len(results["contrasts"]) == 11  # one seed: the paired intervals hold the test set's noise alone
    assert all(c["noise"] == "test-set" and c["ci95"][0] <= c["mean"] <= c["ci95"][1]
               for c in results["contrasts"])
    for method, r in runs.items():
        assert r["status"] == "ok", method
        assert 85 < r["test_acc"] <= 100 and r["train_time_s"] > 0 and 1 <= r["epochs_run"] <= 2
        right = main.right_bits(r["test_right"], results["config"]["test_size"])  # which test images it got right
        assert len(r["test_right"]) == 2 * math.ceil(results["config"]["test_size"] / 8)
        assert 100 * right.mean() == pytest.approx(r["test_acc"]), method
        memory = r["memory"]  # by accounting, in parts, measured on the run's own step: activations included
        assert r["peak_bytes"] > memory["frozen_weights"] + memory["trainable_weights"]  # measured on the CPU too
        assert memory["total"] == sum(v for k, v in memory.items() if k != "total") and memory["activations"] > 0
        if main.adapter_class(method):
            assert r["stored_params"] <= r["trainable_params"] <= 0.12 * base["total_params"]
        row = results["summary"][method]  # one seed: the value itself, and no made-up spread
        assert row["test_acc"] == {"n": 1, "mean": r["test_acc"], "std": None, "ci95": None, "values": [r["test_acc"]]}
    assert "base_on_task" not in results["summary"] and "task_test_acc" not in base  # mnist: nothing shifted
    assert runs["dora"]["trainable_params"] > runs["lora"]["trainable_params"]
    allocation = runs["dyndora"]["rank_allocation"]  # the dynamic rank: pruned to r = 8 per layer on average
    assert allocation["components"] == 12 and sum(allocation["ranks"].values()) == 3 * 8
    assert runs["dyndora"]["stored_params"] < runs["dyndora"]["trainable_params"]  # gates, pruned ones: not saved
    assert "Where the dynamic rank went" in (out / "results.md").read_text()
    qlora = runs["qlora"]
    assert qlora["frozen_weight_bytes"] <= 0.20 * qlora["frozen_weight_fp32_bytes"]
    assert qlora["memory"]["frozen_weights"] < 0.2 * runs["lora"]["memory"]["frozen_weights"]
    assert qlora["memory"]["activations"] == runs["lora"]["memory"]["activations"]  # no fp32 W kept for backward
    table = (out / "results.md").read_text()
    assert all(f"| {main.display(m)} |" in table for m in ["base", *main.COMPARED])
    memory_table = table[table.index("| method | frozen weights | trainable weights | gradients | optimizer (Adam) | "
                                     "kept for backward | total (accounting) | vs Full FT |"):]
    assert all(f"| {main.display(m)} | " in memory_table for m in main.COMPARED)
    assert "- (1 seed)" in table and " ± " not in main.comparison_table(results)  # no spread from one seed
    full = runs["full"]
    assert full["trainable_params"] == full["total_params"] == base["total_params"]
    assert (out / "seed0" / "full_finetuned.pt").stat().st_size == full["file_bytes"]
    assert (out / "seed0" / "base_model.pt").is_file()
    for method, r in runs.items():  # after training: files, and what merging changes
        assert r["file_bytes"] > 0
        if main.adapter_class(method):
            assert 0 <= r["merge_gap"] < 1e-3
            path = out / "seed0" / "adapters" / f"{method}_r8"
            size = (path / "adapter_model.safetensors").stat().st_size
            assert size == r["file_bytes"] and r["file_bytes"] < 0.2 * r["full_model_file_bytes"]
            assert main.load_adapter(out / "seed0" / "base_model.pt", path)
    assert "| method | saved file (KiB) |" in table
    assert "**QUICK RUN: a smoke test" in table and "One seed (0): single values" in table
    assert "mean ± std over" not in table and "epochs (kept) = the epochs each seed ran" in table
    assert abs(qlora["test_acc_in_peft"] - qlora["test_acc"]) < 2  # the adapter on the fp32 base, as PEFT loads it
    assert "QLoRA's adapter as PEFT loads it (as LoRA on the fp32 base): " in table
    assert all("test_acc_in_peft" not in r for m, r in runs.items() if m != "qlora")  # only where PEFT differs


# ------------------------------------------------------------- seeds, a shifted task and a rank sweep
SEEDS_RUN = ["--quick", "--seeds", "2", "--task", "rotated", "--methods", "base,full,lora", "--epochs", "1",
             "--finetune-epochs", "1", "--lr", "3e-3"]  # a rate at which one epoch of the tests' subset learns


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, mnist_dir):
    """--seeds 2 --task rotated --ranks 2,8 --budgets 2,3 on quick settings, recording which seed's data order
    each run used."""
    out, used = tmp_path_factory.mktemp("seeds"), []
    real_run, real_order = main.run_method, main.epoch_order
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, "run_method", lambda ctx, record, trained=None: used.append(
            [record["method"], record["seed"], record["rank"], set()]) or real_run(ctx, record, trained))
        mp.setattr(main, "epoch_order", lambda n, seed, epoch: used[-1][3].add(seed) or real_order(n, seed, epoch))
        code = main.main([*SEEDS_RUN, "--ranks", "2,8", "--budgets", "2,3", "--data-dir", str(mnist_dir),
                          "--out-dir", str(out)])
    return code, out, used


def test_every_method_runs_once_per_seed_and_shares_that_seeds_data_order(seeds_run):
    code, out, used = seeds_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    order = [("base", 0, None), ("full", 0, None), ("lora", 0, 8), ("base", 1, None), ("full", 1, None), ("lora", 1, 8),
             ("lora", 0, 2), ("lora", 1, 2)]  # the main comparison seed by seed, then the sweep
    assert [(r["method"], r["seed"], r["rank"]) for r in results["runs"]] == order
    checks = [("full", 0, None), ("full", 0, None), ("lora", 0, 8), ("lora", 0, 8)]  # then the budget check
    assert [(m, s, r) for m, s, r, _ in used] == order + checks
    assert all(seeds == {seed} for _, seed, _, seeds in used)  # every run of seed k shuffles with seed k alone
    assert results["seeds"] == [0, 1] and results["ranks"] == [2, 8] and results["config"]["task"] == "rotated"
    bases = [torch.load(out / f"seed{s}" / "base_model.pt", weights_only=True)["conv1.weight"] for s in (0, 1)]
    assert not torch.equal(*bases)  # a different initialisation per seed
    for seed in (0, 1):
        for name in ("full_finetuned.pt", "adapters/lora_r8/adapter_model.safetensors",
                     "adapters/lora_r2/adapter_model.safetensors"):
            assert (out / f"seed{seed}" / name).is_file()
    assert json.loads((out / "seed1" / "adapters" / "lora_r2" / "training_info.json").read_text())["task"] == "rotated"


def test_the_summary_gives_mean_std_ci_the_base_on_the_target_and_paired_differences(seeds_run):
    _, out, _ = seeds_run
    results = main.add_summary(json.loads((out / "results.json").read_text()))
    summary, runs = results["summary"], {(r["method"], r["seed"], r["rank"]): r for r in results["runs"]}
    assert list(summary) == ["base", "base_on_task", "full", "lora"]
    for method, key in (("base", "test_acc"), ("base_on_task", "task_test_acc"), ("full", "test_acc"), ("lora", "test_acc")):
        values = [runs["base" if method == "base_on_task" else method, s, 8 if method == "lora" else None][key]
                  for s in (0, 1)]
        stats = summary[method]["test_acc"]
        assert stats["values"] == values and stats["mean"] == pytest.approx(sum(values) / 2)
        assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1] and stats["std"] >= 0
    # the base, trained on upright digits, does poorly on rotated ones; fine-tuning recovers
    assert summary["base_on_task"]["test_acc"]["mean"] < 50 < summary["full"]["test_acc"]["mean"]
    diff = summary["lora"]["vs"]["full"]
    assert diff["values"] == pytest.approx([runs["lora", s, 8]["test_acc"] - runs["full", s, None]["test_acc"] for s in (0, 1)])
    sweep = results["rank_sweep"]["lora"]
    assert [p["rank"] for p in sweep] == [2, 8] and sweep[0]["trainable_params"] < sweep[1]["trainable_params"]
    assert (out / main.SWEEP_PLOT).stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| Base, not fine-tuned (rotated) |" in table and "Rank sweep" in table and " ± " in table
    budgets = [(r["method"], r["epochs"], r["seed"]) for r in results["budget_check"]]  # the first seed, validation only
    assert budgets == [("full", 2, 0), ("full", 3, 0), ("lora", 2, 0), ("lora", 3, 0)]
    assert all("test_acc" not in r and r["status"] == "ok" for r in results["budget_check"])
    assert "| method | 1 epochs (the comparison's) | 2 epochs | 3 epochs |" in table


@pytest.mark.usefixtures("no_plots")
def test_the_console_shows_mean_and_spread_and_resume_adds_only_new_runs(seeds_run, mnist_dir, capsys, tmp_path):
    _, out, _ = seeds_run
    shutil.copytree(out, tmp_path / "out")
    code, stdout, _ = run(capsys, *SEEDS_RUN, "--ranks", "2,4,8", "--resume", "--data-dir", mnist_dir,
                          "--out-dir", tmp_path / "out")
    assert code == 0 and stdout.count("kept.") == 8
    assert stdout.count("Fine-tuning the base model with LoRA r=4") == 2  # only the new rank, once per seed
    assert "LoRA Model Test Accuracy: " in stdout and "% (mean ± std of 2 seeds; 95 % CI [" in stdout
    assert "Base, not fine-tuned (rotated) Model Test Accuracy: " in stdout
    other_task = ["mnist" if arg == "rotated" else arg for arg in SEEDS_RUN]
    code, _, err = run(capsys, *other_task, "--resume", "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 2 and "other settings (task differ)" in err


def record_keys(results):
    return sorted(repr(main.record_key(kind, r)) for kind in main.RECORD_KINDS for r in results[kind])


@pytest.mark.usefixtures("no_plots")
def test_a_resume_with_fewer_methods_or_stopped_half_way_loses_no_earlier_record(seeds_run, mnist_dir, capsys,
                                                                                  tmp_path, monkeypatch):
    """results.json keeps every record of the earlier run: a --resume of fewer methods keeps the others' budget
    checks and rates beside their runs; one stopped at its first new run keeps those it had not reached yet."""
    _, out, _ = seeds_run
    before = json.loads((out / "results.json").read_text())
    shutil.copytree(out, tmp_path / "out")
    fewer = ["base,lora" if arg == "base,full,lora" else arg for arg in SEEDS_RUN]
    code, _, _ = run(capsys, *fewer, "--ranks", "2,8", "--budgets", "2,3", "--resume", "--data-dir", mnist_dir,
                     "--out-dir", tmp_path / "out")
    after = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and record_keys(after) == record_keys(before) and after["methods"] == ["base", "lora"]
    assert after["learning_rates"]["full"] == before["learning_rates"]["full"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "train", stopped)  # Ctrl-C in the first new run: LoRA r=4, seed 0
    code, _, _ = run(capsys, *SEEDS_RUN, "--ranks", "2,4,8", "--budgets", "2,3", "--resume", "--data-dir", mnist_dir,
                     "--out-dir", tmp_path / "out")
    assert code == 130 and record_keys(json.loads((tmp_path / "out" / "results.json").read_text())) == record_keys(before)


def test_loading_a_saved_model_draws_nothing_from_the_global_rng(tmp_path):
    """A run on a base loaded by --resume draws its adapters' init and dropout as one on the base trained in the
    same process: loading builds no random init (it did, so a resumed run's first fine-tuning had other bits)."""
    torch.save(main.CNN().state_dict(), tmp_path / "base_model.pt")
    torch.manual_seed(0)
    model = main.load_plain(tmp_path / "base_model.pt", "cpu")
    drawn = torch.rand(8)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(8))
    saved = torch.load(tmp_path / "base_model.pt", weights_only=True)
    assert all(torch.equal(t, saved[k]) and t.device.type == "cpu" for k, t in model.state_dict().items())


def test_quick_run_console_summary(quick_run, mnist_dir, capsys, tmp_path, monkeypatch):
    """The closing lines (re-printed from a --resume of the same run): labelled quick, results.md's comparison
    table as it is, and the verdict, which also opens results.md."""
    monkeypatch.setattr(main, "plot_results", lambda results, out_dir: [])
    shutil.copytree(quick_run[1], tmp_path / "out")
    code, stdout, _ = run(capsys, "--quick", "--resume", "--data-dir", mnist_dir, "--out-dir", tmp_path / "out")
    assert code == 0 and "Epoch " not in stdout  # everything was kept, nothing retrained
    for name in map(main.display, ["base", *main.COMPARED]):
        assert f"{name} Model Test Accuracy: " in stdout
    summary = stdout[stdout.index("QUICK RUN: a smoke test"):]
    results_md = (tmp_path / "out" / "results.md").read_text()
    table = summary[summary.index("| method |"):summary.index("\n\n")]
    assert table in results_md  # the same table, not a second rendering
    verdict = summary[summary.index("Best test accuracy: "):summary.index("\n\nPlots")].splitlines()
    assert len(verdict) == 4 and "one seed cannot rank methods" in verdict[0]
    assert verdict[1].startswith("Least training memory (by accounting, one step at batch 128): Head only")
    assert f"**Verdict.** {'. '.join(verdict)}." in results_md
    assert results_md.index("**Verdict.**") < results_md.index("Device:")  # results.md opens with it


# --------------------------------------------------------------------------- faults and interruptions
def copy_base(quick_run, tmp_path):
    """A fresh out-dir holding the quick run's results.json and only its base checkpoint: --resume there
    fine-tunes that base again."""
    (tmp_path / "seed0").mkdir()
    for name in ("results.json", "seed0/base_model.pt"):
        shutil.copy2(quick_run[1] / name, tmp_path / name)
    return tmp_path


@pytest.mark.usefixtures("no_plots")
def test_missing_bitsandbytes_skips_qlora_only(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    def unavailable():
        raise main.BitsAndBytesUnavailable("bitsandbytes cannot be imported (ImportError: no module)")
    monkeypatch.setattr(main, "bitsandbytes", unavailable)
    out = copy_base(quick_run, tmp_path)
    code, stdout, _ = run(capsys, "--quick", "--resume", "--methods", "qlora,lora", "--data-dir", mnist_dir, "--out-dir", out)
    methods = runs_by_method(json.loads((out / "results.json").read_text()))
    assert code == 0 and methods["qlora"]["status"] == "skipped" and methods["lora"]["status"] == "ok"
    assert "QLoRA skipped: bitsandbytes cannot be imported" in stdout


@pytest.mark.usefixtures("no_plots")
def test_divergence_fails_that_method_and_the_others_still_run(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    real_run = main.run_method

    def lora_diverges(ctx, record, trained=None):
        return real_run(ctx, record | {"lr": 1e30} if record["method"] == "lora" else record, trained)  # LoRA alone
    monkeypatch.setattr(main, "run_method", lora_diverges)
    out = copy_base(quick_run, tmp_path)
    code, stdout, _ = run(capsys, "--quick", "--resume", "--methods", "lora,dora", "--data-dir", mnist_dir, "--out-dir", out)
    methods = runs_by_method(json.loads((out / "results.json").read_text()))
    assert code == 1
    assert methods["lora"] == {"method": "lora", "seed": 0, "rank": 8, "lr": 1e30, "from_grid": False,
                               "status": "failed", "reason": methods["lora"]["reason"],
                               "train_time_s": methods["lora"]["train_time_s"]}
    assert methods["lora"]["reason"].startswith("diverged at epoch 1") and methods["dora"]["status"] == "ok"
    assert "LoRA Model Test Accuracy: failed (diverged at epoch 1" in stdout


@pytest.mark.usefixtures("no_plots")
def test_cuda_out_of_memory_names_the_method_and_a_remedy(capsys, quick_run, mnist_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(main, "train", oom)
    out = copy_base(quick_run, tmp_path)
    code, stdout, _ = run(capsys, "--quick", "--resume", "--methods", "dora", "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 1 and "DoRA (weight-decomposed) ran out of CUDA memory: try a smaller --batch-size" in stdout


def test_interrupt_keeps_finished_methods_and_resume_continues(capsys, mnist_dir, tmp_path, monkeypatch):
    real_train, calls = main.train, []

    def interrupted_at_lora(model, *args, **kwargs):  # Ctrl-C in the middle of LoRA's training, the first time
        calls.append("lora" if main.adapter_layers(model) else "base")
        if calls[-1] == "lora" and calls.count("lora") == 1:
            raise KeyboardInterrupt
        return real_train(model, *args, **kwargs)
    monkeypatch.setattr(main, "train", interrupted_at_lora)
    argv = ["--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1",
            "--data-dir", mnist_dir, "--out-dir", tmp_path]
    code, _, err = run(capsys, *argv)
    assert code == 130 and "Interrupted: every run finished before it is kept in" in err and "--resume" in err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["base"] and (tmp_path / "seed0" / "base_model.pt").is_file()
    assert (tmp_path / main.PLOT_FILES[0]).is_file()  # the finished base is plotted too

    monkeypatch.setattr(main, "plot_results", lambda results, out_dir: [])  # checked above
    code, _, _ = run(capsys, *argv, "--resume")
    assert code == 0 and calls == ["base", "lora", "lora"]  # the base was not trained again
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["runs"][0] == saved["runs"][0] and resumed["runs"][1]["status"] == "ok"

    code, _, err = run(capsys, *argv[:-2], "--lr", "1e-2", "--data-dir", mnist_dir, "--out-dir", tmp_path, "--resume")
    assert code == 2 and "other settings (lr differ)" in err


def test_a_run_killed_by_sigterm_keeps_every_finished_run(quick_run, mnist_dir, tmp_path):
    """No handler: a scheduler's SIGTERM ends the process at once, and what finished is already in results.json
    (written whole after every run), for --resume to continue and --replot to draw."""
    out = copy_base(quick_run, tmp_path)
    script = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); import main\n"
              "real_train = main.train\n"
              "def train(model, *a, **k):  # a SIGTERM while DoRA trains\n"
              "    if any(isinstance(l, main.DoRALayer) for l in main.adapter_layers(model).values()):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real_train(model, *a, **k)\n"
              f"main.train, main.QUICK_TRAIN_SIZE = train, {main.QUICK_TRAIN_SIZE}  # as this process's quick runs\n"
              f"sys.exit(main.main(['--quick', '--resume', '--methods', 'lora,dora', '--data-dir', {str(mnist_dir)!r}, "
              f"'--out-dir', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -15, proc.stderr  # killed by signal 15, SIGTERM: no handler caught it
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["lora"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_run_shows_its_measured_peak_in_table_console_and_plot(quick_run, capsys, tmp_path, monkeypatch):
    for other in ("plot_curves", "plot_rank_sweep", "plot_lr_sweep"):
        monkeypatch.setattr(main, other, lambda *a: None)  # the comparison figure alone has a memory panel
    results = main.add_summary(json.loads((quick_run[1] / "results.json").read_text()))
    lora = runs_by_method(results)["lora"]
    total, peak = main.fmt_mib(lora["memory"]["total"]), main.fmt_mib(lora["peak_bytes"])
    beyond = f"{(lora['peak_bytes'] - lora['memory']['total']) / 2**20:+.2f}"
    ratio = lora["memory"]["total"] / runs_by_method(results)["full"]["memory"]["total"]
    assert f"| {total} | {ratio:.2f}x | {peak} | {beyond} |" in main.memory_table(results)  # beside it, the difference
    assert "measured peak (torch.profiler)" in main.memory_table(results)
    main.report_method(lora, 128, torch.device("cpu"))
    shown = capsys.readouterr().out
    assert f"Max memory allocated: {peak} MiB measured (torch.profiler, one step at batch 128); by accounting " \
           f"{total}: weights " in shown
    figure = []
    monkeypatch.setattr(main, "write_atomic", lambda path, fig: figure.append(figure_texts(fig)))
    assert main.plot_results(results, tmp_path) == [main.PLOT_FILES[2]] and "measured peak (torch.profiler)" in figure[0]
    old = {**results, "memory_accounting": None, "runs": [{k: v for k, v in r.items() if k != "peak_bytes"}
                                                           for r in results["runs"]]}
    assert "measured" not in main.memory_table(main.add_summary(old))  # a study before peaks: no column


def test_the_memory_sweep_measures_every_method_at_each_width_and_batch_and_trains_nothing(capsys, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("the memory sweep read data"))
    monkeypatch.setattr(main, "train", lambda *a, **k: pytest.fail("the memory sweep trained"))
    code, stdout, _ = run(capsys, "--memory-batches", "1,8", "--memory-widths", "1,2", "--out-dir", tmp_path)
    assert code == 0 and "the largest batch at which each method still trains in less memory" in stdout
    results = json.loads((tmp_path / "results.json").read_text())
    points = {(r["width"], r["batch_size"], r["method"]): r["memory"] for r in results["memory_sweep"]
              if not r["recompute"]}
    assert set(points) == {(w, b, m) for w in (1, 2) for b in (1, 8) for m in main.COMPARED}
    arms = {(r["method"], r["recompute"]) for r in results["memory_sweep"]}
    assert arms == {(m, False) for m in main.COMPARED} | {(m, True) for m in main.COMPARED if main.adapter_class(m)}
    assert all(r["peak_bytes"] >= r["memory"]["total"] for r in results["memory_sweep"])  # measured: all of it
    assert points[1, 8, "full"]["total"] < points[2, 8, "full"]["total"] and results["runs"] == []
    assert points[2, 1, "qlora"]["activations"] == points[2, 1, "lora"]["activations"]
    table = (tmp_path / "results.md").read_text()
    assert "| width | batch | Full FT | Head only | LoRA | LoRA recomputing |" in table
    assert "| method | width 1 (147,146 weights) |" in table and "Memory sweep, measured (torch.profiler)" in table
    assert "Recomputing adapters, at the 16 (adapter, width, batch) points" in table
    assert (tmp_path / main.MEMORY_PLOT).stat().st_size > 10_000 and not (tmp_path / main.PLOT_FILES[2]).exists()
    code, _, err = run(capsys, "--memory-batches", "1", "--memory-widths", "1", "--out-dir", tmp_path)
    assert code == 2 and "holds a run's results" in err  # a sweep's folder is a run's like any other


@pytest.mark.usefixtures("no_plots")
def test_resume_keeps_only_methods_whose_saved_model_is_still_there(capsys, quick_run, mnist_dir, tmp_path):
    out = tmp_path
    (out / "seed0" / "adapters").mkdir(parents=True)
    for name in ("results.json", "seed0/base_model.pt", "seed0/full_finetuned.pt"):  # dora's, qlora's are gone
        (out / name).write_bytes((quick_run[1] / name).read_bytes())
    shutil.copytree(quick_run[1] / "seed0/adapters/lora_r8", out / "seed0/adapters/lora_r8")
    code, stdout, _ = run(capsys, "--quick", "--resume", "--methods", "base,full,lora,dora", "--data-dir", mnist_dir,
                          "--out-dir", out)
    assert code == 0
    assert stdout.count("finished in a previous run (results.json), kept.") == 3  # base, full, lora
    assert "Fine-tuning the base model with DoRA (weight-decomposed), lr " in stdout


# ------------------------------------------------------------------ a new method: one row and one class
class DoubledLoRALayer(main.LoRALayer):
    """A toy method: LoRA with its update doubled, dW = 2 (alpha/r) B A."""

    def lora(self, x):
        return 2 * super().lora(x)

    def delta_weight(self):
        return 2 * super().delta_weight()


def figure_texts(fig):
    import matplotlib.text
    return " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def test_a_new_method_is_one_row_and_one_class(capsys, mnist_dir, tmp_path, monkeypatch):
    """Registered as a user would add it to main.py, and found everywhere: its row in results.md and on the
    console, every plot that draws the methods, its saved folder, load_adapter, and --resume keeping it."""
    monkeypatch.setattr(main, "DoubledLoRALayer", DoubledLoRALayer, raising=False)  # the one class
    monkeypatch.setitem(main.METHODS, "lora2x", main.Method("LoRA x2", "tab:pink", "P", 1e-3, "adapters",
                                                             "DoubledLoRALayer"))  # the one row
    monkeypatch.setattr(main, "MAX_EXTENSIONS", 0)  # the two rates asked for: a grid, not its growth (tested apart)
    drawn, real_write = {}, main.write_atomic
    monkeypatch.setattr(main, "write_atomic", lambda path, content: (
        drawn.__setitem__(Path(path).name, figure_texts(content)) if hasattr(content, "savefig") else None,
        real_write(path, content))[1])
    argv = ["--quick", "--methods", "base,lora2x", "--epochs", "1", "--finetune-epochs", "1", "--lrs", "1e-3,3e-3",
            "--ranks", "2,8", "--data-dir", mnist_dir, "--out-dir", tmp_path]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and "Fine-tuning the base model with LoRA x2, lr " in stdout
    table = (tmp_path / "results.md").read_text()
    assert "| LoRA x2 |" in table and "| LoRA x2 | 2 |" in table and "| LoRA x2 | 0.003 |" in table  # main, sweep, grid
    assert "LoRA x2 Model Test Accuracy: " in stdout and "\n| LoRA x2 |" in stdout[stdout.index("QUICK RUN: a smoke"):]
    for name in [*main.PLOT_FILES, main.SWEEP_PLOT, main.LR_PLOT]:
        assert "LoRA x2" in drawn[name], name
    results = json.loads((tmp_path / "results.json").read_text())
    run_ = next(r for r in results["runs"] if r["method"] == "lora2x" and r["rank"] == 8)
    folder = tmp_path / "seed0" / "adapters" / "lora2x_r8"
    assert json.loads((folder / "training_info.json").read_text())["method"] == "lora2x"
    loaded = main.load_adapter(tmp_path / "seed0" / "base_model.pt", folder)
    assert isinstance(loaded.conv1, DoubledLoRALayer)
    test_split = main.load_splits(main.parse_args([str(a) for a in argv]), torch.device("cpu"))["mnist"]["test"]
    assert main.evaluate(loaded, *test_split)[1] == pytest.approx(run_["test_acc"], abs=0.015)  # the trained one
    assert 0 <= run_["merge_gap"] < 1e-3  # merged, it computes what it computed
    monkeypatch.setattr(main, "plot_results", lambda results, out_dir: [])  # drawn and checked above
    code, stdout, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "Epoch " not in stdout  # nothing trained again: the base, every grid run, ranks 8 and 2 kept
    assert stdout.count("kept.") == 1 + len(results["lr_grid"]) + 2


# --------------------------------------------------------------------------- main.py reads top to bottom
def names_used_above_their_definition(source):
    """{module-level name: (line of a use above its definition, line of the definition)}: every load of a module
    name, in module code or in a function that does not bind that name itself, comes after its definition."""
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        targets = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                   [n.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if t is not None
                    for n in ast.walk(t) if isinstance(n, ast.Name)])
        for name in targets:
            defined.setdefault(name, node.lineno)
    early = {}

    def visit(node, bound):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            args = node.args
            bound = bound | {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} | {
                a.arg for a in (args.vararg, args.kwarg) if a} | {
                n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in defined
                and node.id not in bound and node.lineno < defined[node.id]):
            early.setdefault(node.id, (node.lineno, defined[node.id]))
        for child in ast.iter_child_nodes(node):
            visit(child, bound)
    visit(tree, frozenset())
    return early


def test_every_module_name_is_defined_above_its_first_use():
    assert names_used_above_their_definition("x = 1\ndef f():\n    return y\ny = 2\n") == {"y": (3, 4)}  # it finds one
    assert names_used_above_their_definition("def f(y):\n    return y\ny = 2\n") == {}  # a parameter is not it
    assert names_used_above_their_definition((ROOT / "main.py").read_text()) == {}


# ----------------------------------------------------------------------------------------- the first hour
@pytest.mark.usefixtures("no_plots")
def test_a_run_on_a_busy_machine_says_its_times_are_not_comparable(capsys, mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a machine shared with many processes
    code, stdout, _ = run(capsys, "--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1",
                          "--data-dir", mnist_dir, "--out-dir", tmp_path)
    busy = f"The machine was busy (load above its {os.cpu_count()} cores plus one) as 2 of 2 runs started or ended"
    assert code == 0 and busy in stdout and busy in (tmp_path / "results.md").read_text()
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert all(r["load"] == [64.0, 64.0] and 0 < r["cpu_time_s"] for r in runs)
    assert "== Run 1 of 2 ==" in stdout and "== Run 2 of 2, about " in stdout  # progress over the whole run


def test_a_changed_setting_shows_on_the_console_in_results_md_and_in_every_title(capsys, mnist_dir, tmp_path,
                                                                                 monkeypatch):
    titles, real_write = {}, main.write_atomic
    monkeypatch.setattr(main, "write_atomic", lambda path, content: (
        titles.__setitem__(Path(path).name, figure_texts(content)) if hasattr(content, "savefig") else None,
        real_write(path, content))[1])
    code, stdout, _ = run(capsys, "--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1",
                          "--rank", "4", "--data-dir", mnist_dir, "--out-dir", tmp_path)
    changed = "epochs 1, finetune epochs 1, rank 4"
    assert code == 0 and f"settings other than main.py's defaults: {changed}" in stdout
    assert f"Settings other than main.py's defaults: {changed}." in (tmp_path / "results.md").read_text()
    assert titles and all(f"(settings other than the defaults: {changed})" in text for text in titles.values())


# ------------------------------------------------------------------------------ the memory sweep's defects
def test_a_sweep_without_full_fine_tuning_names_no_crossover(capsys, tmp_path):
    code, stdout, _ = run(capsys, "--memory-batches", "1,8", "--memory-widths", "1", "--methods", "base,lora,qlora",
                          "--out-dir", tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert code == 0 and "No crossover: full fine-tuning was not measured" in stdout and "none" not in stdout
    assert "(none: full fine-tuning was not in --methods, so not measured)" in table


def test_a_sweep_of_no_fine_tuning_method_is_refused_before_any_work(capsys, tmp_path):
    code, _, err = run(capsys, "--memory-batches", "8", "--methods", "base", "--out-dir", tmp_path / "out")
    assert code == 2 and "--memory-batches measures fine-tuning methods" in err and not (tmp_path / "out").exists()


def test_a_sweep_names_only_the_files_it_wrote(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main, "plot_results", lambda results, out_dir: [])  # no figure drawn
    code, stdout, _ = run(capsys, "--memory-batches", "1", "--memory-widths", "1", "--out-dir", tmp_path)
    assert code == 0 and "results.md (every point), results.json are in" in stdout and main.MEMORY_PLOT not in stdout


def test_ctrl_c_in_a_sweep_does_not_advise_resume(capsys, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "memory_sweep", interrupted)
    code, _, err = run(capsys, "--memory-batches", "1", "--memory-widths", "1", "--out-dir", tmp_path)
    assert code == 130 and "nothing was kept; run it again" in err and "--resume" not in err


def test_a_sweep_point_beyond_the_memory_available_is_refused_before_any_is_measured(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main, "available_memory", lambda device: 2**30)  # 1 GiB, as under a memory limit
    monkeypatch.setattr(main, "step_memory", lambda *a: pytest.fail("a point was measured"))
    code, _, err = run(capsys, "--memory-batches", "8,4096", "--memory-widths", "1,16", "--out-dir", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "(width 16, batch 4096) needs about 11.1 GiB" in err
    assert "more than the 1.0 GiB available on cpu" in err and not (tmp_path / "o" / "results.json").exists()


def test_the_sweeps_estimate_is_above_every_measured_point():
    """step_estimate (shapes only) against the committed sweep's accounting, every method, width and batch."""
    sweep = json.loads((ROOT / "plots" / "memory" / "results.json").read_text())["memory_sweep"]
    assert sweep and all(p["memory"]["total"] <= main.step_estimate(p["width"], p["batch_size"]) for p in sweep)
