"""The runs: seeds sharing their data order, a shifted task, a rank sweep and the budget check; an interruption
that loses nothing; a new method added as one row and one class. (Split from test_main.py so that the two halves
of the end-to-end tests run side by side under pytest-xdist.)"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import main
from conftest import run


# ------------------------------------------------------------- seeds, a shifted task and a rank sweep
@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, mnist_dir):
    """--seeds 2 --task rotated --ranks 2,8 on quick settings, recording which seed's data order each run used."""
    out, used = tmp_path_factory.mktemp("seeds"), []
    real_run, real_order = main.run_method, main.epoch_order
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, "run_method", lambda ctx, key, *a: used.append([*key, set()]) or real_run(ctx, key, *a))
        mp.setattr(main, "epoch_order", lambda n, seed, epoch: used[-1][3].add(seed) or real_order(n, seed, epoch))
        mp.setattr(main, "measure_inference", lambda *a, **k: None)  # not what these tests look at
        code = main.main(["--quick", "--seeds", "2", "--task", "rotated", "--ranks", "2,8", "--methods", "base,full,lora",
                          "--epochs", "1", "--finetune-epochs", "1", "--budgets", "2,3", "--data-dir", str(mnist_dir),
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
    results = json.loads((out / "results.json").read_text())
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
    assert (out / main.BUDGET_PLOT).stat().st_size > 10_000


def test_the_console_shows_mean_and_spread_and_resume_adds_only_new_runs(seeds_run, mnist_dir, capsys, tmp_path):
    _, out, _ = seeds_run
    shutil.copytree(out, tmp_path / "out")
    code, stdout, _ = run(capsys, "--quick", "--seeds", "2", "--task", "rotated", "--ranks", "2,4,8", "--methods",
                          "base,full,lora", "--epochs", "1", "--finetune-epochs", "1", "--resume", "--data-dir",
                          mnist_dir, "--out-dir", tmp_path / "out")
    assert code == 0 and stdout.count("kept.") == 8
    assert stdout.count("Fine-tuning the base model with LoRA r=4") == 2  # only the new rank, once per seed
    assert "LoRA Model Test Accuracy: " in stdout and "% (mean ± std of 2 seeds; 95 % CI [" in stdout
    assert "Base, not fine-tuned (rotated) Model Test Accuracy: " in stdout
    code, _, err = run(capsys, "--quick", "--seeds", "2", "--task", "inverted", "--methods", "base,full,lora",
                       "--epochs", "1", "--finetune-epochs", "1", "--resume", "--data-dir", mnist_dir, "--out-dir", out)
    assert code == 2 and "other settings (task differ)" in err


# ---------------------------------------------------------------------------------- an interruption
def test_interrupt_keeps_finished_methods_and_resume_continues(capsys, mnist_dir, tmp_path, monkeypatch):
    real_run, calls = main.run_method, []

    def interrupted_at_lora(ctx, key, *args):
        calls.append(key[0])
        if key[0] == "lora" and calls.count("lora") == 1:
            raise KeyboardInterrupt
        return real_run(ctx, key, *args)
    monkeypatch.setattr(main, "run_method", interrupted_at_lora)
    argv = ["--quick", "--methods", "base,lora", "--epochs", "1", "--finetune-epochs", "1",
            "--data-dir", mnist_dir, "--out-dir", tmp_path]
    code, _, err = run(capsys, *argv)
    assert code == 130 and "Interrupted during LoRA" in err and "--resume" in err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["base"] and (tmp_path / "seed0" / "base_model.pt").is_file()
    assert (tmp_path / main.PLOT_FILES[2]).is_file()  # the finished base is plotted too

    code, _, _ = run(capsys, *argv, "--resume")
    assert code == 0 and calls == ["base", "lora", "lora"]  # the base was not trained again
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["runs"][0] == saved["runs"][0] and resumed["runs"][1]["status"] == "ok"
    assert "latency_ms" in resumed["inference"]["base"]  # measured at the end, resumed methods included

    code, _, err = run(capsys, *argv[:-2], "--lr", "1e-2", "--data-dir", mnist_dir, "--out-dir", tmp_path, "--resume")
    assert code == 2 and "other settings (lr differ)" in err


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
    assert "LoRA x2 Model Test Accuracy: " in stdout and "\nLoRA x2 " in stdout[stdout.index("QUICK RUN: a smoke"):]
    for name in [*(n for n in main.PLOT_FILES if n not in ("base_model_loss_accuracy.png", "lora_loss_accuracy.png")),
                 main.SWEEP_PLOT, main.LR_PLOT]:
        assert "LoRA x2" in drawn[name], name
    results = json.loads((tmp_path / "results.json").read_text())
    run_ = next(r for r in results["runs"] if r["method"] == "lora2x" and r["rank"] == 8)
    folder = tmp_path / "seed0" / "adapters" / "lora2x_r8"
    assert json.loads((folder / "training_info.json").read_text())["method"] == "lora2x"
    loaded = main.load_adapter(tmp_path / "seed0" / "base_model.pt", folder)
    assert isinstance(loaded.conv1, DoubledLoRALayer)
    splits = main.make_splits(main.load_dataset(mnist_dir, download=False), torch.device("cpu"))
    assert main.evaluate(loaded, *splits["test"])[1] == pytest.approx(run_["test_acc"], abs=0.015)  # the trained one
    assert "lora2x" in results["inference"]
    code, stdout, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "Epoch " not in stdout  # nothing trained again: the base, every grid run, ranks 8 and 2 kept
    assert stdout.count("kept.") == 1 + len(results["lr_grid"]) + 2
