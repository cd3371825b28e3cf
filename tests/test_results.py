"""Results over seeds: the t quantile, mean/std/95 % CI, paired differences, the summary rows, the rank sweep."""
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

import main


def t_cdf(t, df, steps=200_000):
    """P(T <= t) for Student's t with df degrees of freedom, by Simpson's rule on the density over [0, t]."""
    x = torch.linspace(0, t, steps + 1, dtype=torch.float64)
    log_c = torch.lgamma(torch.tensor((df + 1) / 2, dtype=torch.float64)) - torch.lgamma(
        torch.tensor(df / 2, dtype=torch.float64)) - 0.5 * math.log(df * math.pi)
    density = torch.exp(log_c - (df + 1) / 2 * torch.log1p(x**2 / df))
    w = torch.ones_like(x)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return 0.5 + (t / steps / 3 * (w * density).sum()).item()


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 30, 31, 60, 200])
def test_t_quantile_leaves_2_5_percent_in_each_tail(df):
    assert t_cdf(main.t_975(df), df) == pytest.approx(0.975, abs=2e-4)


def test_mean_std_ci_by_hand():
    s = main.mean_std_ci([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2) = 4.302653 (tables to 7 digits) * std / sqrt(n)
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0 and s["values"] == [1.0, 2.0, 3.0]
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    one = main.mean_std_ci([99.2])
    assert one == {"n": 1, "mean": 99.2, "std": None, "ci95": None, "values": [99.2]}  # no spread from one run


def run(method, seed, acc, rank=None, status="ok", **extra):
    if status != "ok":
        return {"method": method, "seed": seed, "rank": rank, "status": status, "reason": "diverged at epoch 1",
                "train_time_s": 1.0}
    r = {"method": method, "seed": seed, "rank": rank, "status": "ok", "test_acc": acc, "train_time_s": 10.0 + seed,
         "peak_bytes": None, "epochs_run": 4, "best_epoch": 3, "history": {}, "lr": 1e-3, "from_grid": False}
    r.update({k: 1000 * (rank or 100) for k in main.SAME_FOR_EVERY_SEED + main.PER_SEED_SIZES})
    r["memory"] = {key: 100 * (rank or 100) for key, *_ in main.MEMORY_PARTS}
    r["memory"]["total"] = sum(r["memory"].values())
    return {**r, **extra}


def fake_results(ranks=()):
    runs = [run("base", 0, 99.0, task_test_acc=12.0), run("base", 1, 99.2, task_test_acc=14.0),
            run("base", 2, 99.1, task_test_acc=13.0),
            run("full", 0, 97.0), run("full", 1, 97.4), run("full", 2, 97.3),
            run("lora", 0, 96.0, rank=8), run("lora", 1, 96.6, rank=8), run("lora", 2, 96.0, rank=8),
            run("dora", 0, 96.5, rank=8), run("dora", 1, 0, rank=8, status="failed"), run("dora", 2, 96.1, rank=8),
            run("lora", 0, 90.0, rank=2), run("lora", 1, 91.0, rank=2)]
    return {"config": {"rank": 8, "task": "rotated", "quick": False, "finetune_epochs": 4, "batch_size": 128},
            "methods": ["base", "full", "lora", "dora"], "seeds": [0, 1, 2], "ranks": list(ranks), "runs": runs,
            "other_runs": [], "lr_grid": [], "budget_check": [], "learning_rates": {}}


def test_paired_difference_is_taken_seed_by_seed_over_the_seeds_both_finished():
    results = fake_results()
    d = main.paired_difference(results, "lora", "full")  # the rank-2 sweep runs of LoRA are not mixed in
    assert d["values"] == pytest.approx([-1.0, -0.8, -1.3]) and d["n"] == 3
    # the same numbers unpaired would have a spread of both methods' seeds; paired, only the differences'
    assert d["std"] == pytest.approx(statistics.stdev([-1.0, -0.8, -1.3]))
    assert main.paired_difference(results, "dora", "lora")["values"] == pytest.approx([0.5, 0.1])  # seed 1 failed
    assert main.paired_difference(results, "dora", "qlora") is None


def right_hex(right):
    """A list of 0/1 (one per image) as right_images writes it: bits packed 8 to a byte, in hex."""
    right = list(right) + [0] * (-len(right) % 8)
    return bytes(int("".join(map(str, right[i:i + 8])), 2) for i in range(0, len(right), 8)).hex()


def test_the_paired_interval_of_one_seed_is_the_test_sets_noise_alone():
    """Two runs on n = 1,000 images, a right on 30 that b misses and b on 10 that a misses: the difference is
    2 points, its variance the test set's alone, Var(D_i) / n with D_i = +100, -100 or 0 (one seed: no seed noise)."""
    n, only_a, only_b = 1000, 30, 10
    a = [1] * only_a + [0] * only_b + [1] * 900 + [0] * 60
    b = [0] * only_a + [1] * only_b + [1] * 900 + [0] * 60
    got = main.paired_interval([(right_hex(a), right_hex(b))], n)
    mean = 100 * (only_a - only_b) / n
    var_d = (100**2 * (only_a + only_b) - n * mean**2) / (n - 1)  # sample variance of D_i, by its sums
    half = main.t_975(n - 1) * math.sqrt(var_d / n)
    assert got["mean"] == pytest.approx(2.0) and got["df"] == pytest.approx(n - 1)
    assert got["ci95"] == pytest.approx([mean - half, mean + half])
    assert got["ci95"][0] > 0 and half == pytest.approx(1.96 * 0.632, abs=0.01)  # sqrt(40 - 20**2/1000) / 10 = 0.632


def anova_by_hand(d):
    """The two-way table's mean squares (seed, image, error) by plain sums, apart from numpy."""
    S, n = len(d), len(d[0])
    grand = sum(map(sum, d)) / (S * n)
    seed = [sum(row) / n for row in d]
    image = [sum(d[s][i] for s in range(S)) / S for i in range(n)]
    ms_seed = n * sum((x - grand) ** 2 for x in seed) / (S - 1)
    ms_image = S * sum((x - grand) ** 2 for x in image) / (n - 1)
    ms_error = sum((d[s][i] - seed[s] - image[i] + grand) ** 2 for s in range(S) for i in range(n)) / ((S - 1) * (n - 1))
    return grand, ms_seed, ms_image, ms_error


def test_the_crossed_interval_counts_the_seed_image_disagreement_once():
    """3 seeds x 6 images: Var(mean) = (MS_seed + MS_image - MS_error) / (nS), Satterthwaite's df over the three
    mean squares (df 2, 5 and 10), Student's t there."""
    d = [[100, 0, 0, 100, -100, 0], [100, 100, 0, 0, 0, 0], [0, 100, 0, 100, 0, -100]]
    grand, ms_seed, ms_image, ms_error = anova_by_hand(d)
    assert ms_image > ms_error  # the image part is positive here
    S, n = 3, 6
    terms = [(ms_seed / (n * S), 2), (ms_image / (n * S), 5), (-ms_error / (n * S), 10)]
    var = sum(v for v, _ in terms)
    df = var**2 / sum(v**2 / k for v, k in terms)
    half = main.t_975(df) * math.sqrt(var)
    got = main.crossed_interval(d)
    assert got["mean"] == pytest.approx(grand) and got["se"] == pytest.approx(math.sqrt(var))
    assert got["df"] == pytest.approx(df) and got["ci95"] == pytest.approx([grand - half, grand + half])


def test_the_crossed_interval_takes_an_image_part_below_zero_as_zero():
    """Three seeds where a beats b on 10, 20 and 60 of 1,000 images, never the same image twice (the images agree
    across seeds less than chance): the seeds' term alone, MS_seed / (nS) = the per-seed means' variance / S, df 2."""
    n, leads, starts = 1000, (10, 20, 60), (0, 10, 30)
    d = [[100 * (start <= i < start + k) for i in range(n)] for k, start in zip(leads, starts)]
    _, ms_seed, ms_image, ms_error = anova_by_hand(d)
    assert ms_image < ms_error
    got = main.paired_interval([(right_hex([x // 100 for x in row]), right_hex([0] * n)) for row in d], n)
    per_seed = [100 * k / n for k in leads]  # 1, 2, 6 points
    assert got["se"] == pytest.approx(math.sqrt(statistics.variance(per_seed) / 3)) and got["df"] == pytest.approx(2)
    assert got["ci95"] == pytest.approx(main.mean_std_ci(per_seed)["ci95"])  # the seeds' t-interval


def latent_threshold_tables(rng, reps, seeds, n, image, seed, error):
    """(the true difference in points, `reps` S x n tables of d): image i is right for method m in seed s when
    mu_m + z_i + u_mi + v_ms + e_msi > 0, with a difficulty z_i ~ N(0, 1) both share, an image effect u ~ N(0,
    image^2), a seed effect v ~ N(0, seed^2) and a flip e ~ N(0, error^2) of each run on each image; images and
    seeds drawn fresh for every table. The truth is P(right) of one method minus the other's, in closed form."""
    mu, scale = (1.5, 1.3), math.sqrt(1 + image**2 + seed**2 + error**2)
    truth = 100 * (statistics.NormalDist().cdf(mu[0] / scale) - statistics.NormalDist().cdf(mu[1] / scale))
    tables = []
    for _ in range(reps):
        z = rng.normal(0, 1, n)
        right = [m + z + rng.normal(0, image, n) + rng.normal(0, seed, (seeds, 1)) + rng.normal(0, error, (seeds, n))
                 > 0 for m in mu]
        tables.append(100 * (right[0].astype(float) - right[1]))
    return truth, tables


@pytest.mark.parametrize("scenario", [dict(image=1.0, seed=0.0, error=0.15),   # 97 % of Var(mean) from images
                                      dict(image=0.0, seed=0.0, error=1.0),    # 98 %: the runs' own flips
                                      dict(image=0.1, seed=0.15, error=0.3)])  # 96 %: the seeds
def test_the_crossed_interval_covers_95_percent_whichever_noise_dominates(scenario):
    """2,000 simulated studies of 5 seeds on 1,000 images each: the crossed interval holds the truth 93.5-96.5 %
    of the time (Monte Carlo standard error 0.5 points); where images dominate, the seeds' t-interval alone (which
    sees no image noise) falls far short."""
    truth, tables = latent_threshold_tables(np.random.default_rng(0), 2000, 5, 1000, **scenario)
    covered = statistics.fmean(lo <= truth <= hi for lo, hi in (main.crossed_interval(d)["ci95"] for d in tables))
    assert 0.935 <= covered <= 0.965
    if scenario["image"] == 1.0:
        seed_only = statistics.fmean(lo <= truth <= hi for lo, hi in
                                     (main.mean_std_ci(d.mean(axis=1))["ci95"] for d in tables))
        assert seed_only < 0.9


def test_two_identical_runs_differ_by_zero_with_no_spread():
    same = right_hex([1, 0, 1, 1] * 5)
    assert main.paired_interval([(same, same)] * 2, 20)["ci95"] == [0.0, 0.0]


@pytest.mark.parametrize("df", [1, 2, 3, 9, 30, 200])
def test_the_p_value_is_5_percent_at_the_t_quantile_and_matches_closed_forms(df):
    assert main.t_p_value(main.t_975(df), df) == pytest.approx(0.05, abs=2e-4)
    assert main.t_p_value(0.0, df) == 1.0
    assert 1 - main.t_p_value(1.7, df) == pytest.approx(2 * (t_cdf(1.7, df) - 0.5), abs=1e-6)  # Simpson, above
    assert main.t_p_value(50.0, 1) == pytest.approx(2 / math.pi * math.atan(1 / 50))  # Cauchy: closed form
    assert main.t_p_value(0.5, 2) == pytest.approx(1 - 0.5 / math.sqrt(2.25))  # df 2: 1 - t / sqrt(2 + t^2)


def test_holm_multiplies_the_ith_smallest_p_by_m_minus_i_plus_1_and_keeps_the_order():
    assert main.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert main.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_primary_contrasts_are_the_named_pairs_paired_over_seeds_and_holm_adjusted():
    results = fake_results()  # methods base, full, lora, dora; dora failed on seed 1
    contrasts = main.primary_contrasts(results)
    assert [(c["method"], c["ref"]) for c in contrasts] == [("lora", "full"), ("dora", "full"), ("dora", "lora")]
    lora = contrasts[0]  # lora - full on seeds 0, 1, 2: -1.0, -0.8, -1.3
    d = [-1.0, -0.8, -1.3]
    se = statistics.stdev(d) / math.sqrt(3)
    assert lora["mean"] == pytest.approx(statistics.fmean(d)) and lora["noise"] == "seed"
    assert lora["p"] == pytest.approx(main.t_p_value(statistics.fmean(d) / se, 2))
    assert [c["p_holm"] for c in contrasts] == pytest.approx(main.holm([c["p"] for c in contrasts]))


def test_primary_contrasts_hold_test_set_noise_once_runs_record_their_test_images():
    results = fake_results()
    results["config"]["test_size"] = 1000
    for r in results["runs"]:  # lora right on the first 30 images that full misses, every seed alike
        r["test_right"] = right_hex([1] * 30 + [0] * 970) if r["method"] == "lora" else right_hex([0] * 1000)
    lora = main.primary_contrasts(results)[0]
    expected = main.paired_interval([(right_hex([1] * 30 + [0] * 970), right_hex([0] * 1000))] * 3, 1000)
    assert lora["noise"] == "seed and test-set" and lora["mean"] == pytest.approx(3.0)
    assert lora["ci95"] == pytest.approx(expected["ci95"]) and lora["ci95"][0] > 0


def test_summary_rows_hold_means_spreads_byte_counts_and_the_base_on_the_target():
    results = fake_results()
    summary = main.summarize(results)
    assert list(summary) == ["base", "base_on_task", "full", "lora", "dora"]
    assert summary["base_on_task"]["test_acc"]["mean"] == pytest.approx(13.0)
    assert summary["base_on_task"]["test_acc"]["std"] == pytest.approx(1.0)
    lora = summary["lora"]
    assert lora["test_acc"]["values"] == [96.0, 96.6, 96.0]  # the rank-2 sweep runs are not in the main row
    assert lora["trainable_params"] == 8000 and lora["seeds"] == [0, 1, 2]
    assert lora["train_time_s"]["mean"] == pytest.approx(11.0) and lora["peak_bytes"] is None
    assert lora["vs"]["full"]["mean"] == pytest.approx(-1.0333, abs=1e-3) and "lora" not in lora["vs"]
    dora = summary["dora"]
    assert dora["test_acc"]["n"] == 2 and dora["failed"] == ["seed 1: failed (diverged at epoch 1)"]
    table = main.comparison_table(main.add_summary(results))
    assert "| Base (MNIST) | 0.001 | 99.10 ± 0.10 |" in table and "| Base, not fine-tuned (rotated) | - | 13.00 ± 1.00 |" in table
    assert "DoRA (weight-decomposed) (1 run(s) seed 1: failed" in table and "| -1.03 [" in table


def test_every_run_failed_is_one_status_row():
    results = fake_results()
    results["runs"] = [r for r in results["runs"] if r["method"] != "dora"] + [run("dora", 0, 0, 8, status="failed")]
    assert main.summarize(results)["dora"] == {"status": "failed", "reason": "diverged at epoch 1"}
    assert "| DoRA (weight-decomposed) | - | failed: diverged at epoch 1 |" in main.comparison_table(main.add_summary(results))


def test_rank_sweep_has_one_point_per_rank_that_ran_and_the_main_rank():
    results = fake_results()  # lora ran at ranks 8 and 2, dora at 8 only
    no_sweep = {**results, "runs": [r for r in results["runs"] if r["rank"] != 2]}
    assert main.rank_sweep(no_sweep) == {}
    sweep = main.rank_sweep(results)
    assert list(sweep) == ["lora"]  # adapter methods that ran at another rank
    assert [(p["rank"], p["trainable_params"]) for p in sweep["lora"]] == [(2, 2000), (8, 8000)]
    assert sweep["lora"][0]["test_acc"]["values"] == [90.0, 91.0]
    assert sweep["lora"][0]["vs_full"]["values"] == pytest.approx([-7.0, -6.4])  # 90.0 - 97.0, 91.0 - 97.4: by seed
    assert "| LoRA | 2 | 0.001 | 2,000 | 2,000 | 90.50 ± 0.71 |" in main.rank_sweep_table(main.add_summary(fake_results()))
    resumed = {**no_sweep, "other_runs": [r for r in results["runs"] if r["rank"] == 2]}  # swept in an earlier run
    assert main.rank_sweep(resumed) == sweep


def test_rank_sweep_pairs_each_adapter_with_lora_at_the_same_rank_and_seed():
    results = fake_results()
    results["runs"] += [run("dora", 0, 90.5, rank=2, lr=3e-3), run("dora", 1, 90.8, rank=2, lr=3e-3)]
    dora = {p["rank"]: p for p in main.rank_sweep(results)["dora"]}
    assert dora[2]["vs_lora"]["values"] == pytest.approx([0.5, -0.2])  # 90.5 - 90.0, 90.8 - 91.0: lora at r = 2
    assert dora[8]["vs_lora"]["values"] == pytest.approx([0.5, 0.1])  # r = 8: seed 1 of dora failed
    assert dora[2]["lr"] == 3e-3 and main.rank_sweep(results)["lora"][0]["vs_lora"] is None  # no LoRA - LoRA


def test_a_variant_is_contrasted_with_its_own_row_and_with_lora():
    results = fake_results()
    results["methods"] += ["dyndora", "dyndora_params", "lora_bias"]
    for seed, (a, b, c) in enumerate([(96.1, 96.3, 96.4), (96.5, 96.4, 96.9), (96.2, 96.6, 96.1)]):
        results["runs"] += [run("dyndora", seed, a, rank=8), run("dyndora_params", seed, b, rank=8),
                            run("lora_bias", seed, c, rank=8)]
    pairs = [(c["method"], c["ref"]) for c in main.primary_contrasts(results)]
    assert ("dyndora_params", "dyndora") in pairs and ("lora_bias", "lora") in pairs
    assert ("lora_bias", "dyndora") not in pairs and pairs.count(("lora_bias", "lora")) == 1
    assert main.variant_of("lora_bias") == "lora" and main.variant_of("dyndora_params") == "dyndora"
    assert main.variant_of("dora") is None


def test_mean_curve_ends_at_the_last_epoch_every_run_reached():
    runs = [{"history": {"val_acc": [90.0, 92.0, 93.0]}}, {"history": {"val_acc": [88.0, 94.0]}}]
    epochs, mean, std = main.mean_curve(runs, "val_acc")
    assert epochs == [1, 2] and mean == [89.0, 93.0]  # epoch 3 held one run: not drawn as a mean of two
    assert std == pytest.approx([math.sqrt(2), math.sqrt(2)])


def test_plots_with_seeds_and_a_sweep_are_drawn_from_results_alone(tmp_path):
    results = fake_results(ranks=[2])
    for r in results["runs"]:
        if r["status"] == "ok":
            r["history"] = {k: [1.0, 0.5] for k in ("train_loss", "val_loss")} | {"val_acc": [90.0, r["test_acc"]]}
        r["val_right"], r["best_epoch"] = "ff00", 2  # 16 validation images
    results["environment"] = {"device_name": "test"}
    results["config"] |= {"test_size": 10_000, "val_size": 16}
    grid = {"method": "lora", "seed": 0, "rank": 8, "val_loss": 0.1, "epochs_run": 4, "best_epoch": 3}
    results["lr_grid"] = [grid | {"lr": 1e-3, "status": "ok", "val_acc": 96.0, "extension": False},
                          grid | {"lr": 1e-2, "status": "unstable", "val_acc": 10.5, "extension": False}]
    results["learning_rates"] = {"lora": {"lr": 1e-3, "chosen_by": "validation grid"}}
    results["budget_check"] = [{"method": "lora", "seed": 0, "rank": 8, "lr": 1e-3, "epochs": 8, "status": "ok",
                                "val_acc": 96.5, "val_right": "ff80"}]
    written = main.plot_results(main.add_summary(results), tmp_path)
    assert set(written) == set(main.PLOT_FILES) | {main.SWEEP_PLOT, main.LR_PLOT}
    assert all((tmp_path / name).stat().st_size > 10_000 for name in written)


def test_the_comparison_figure_stacks_training_memory_in_its_parts(tmp_path, monkeypatch):
    results = fake_results()
    for r in results["runs"]:
        if r["status"] == "ok":
            r["history"] = {k: [1.0, 0.5] for k in ("train_loss", "val_loss")} | {"val_acc": [90.0, r["test_acc"]]}
    results["environment"], results["config"]["test_size"] = {"device_name": "test"}, 10_000
    figures, real_write = {}, main.write_atomic
    monkeypatch.setattr(main, "write_atomic", lambda path, fig: figures.__setitem__(Path(path).name, fig)
                        or real_write(path, fig))
    main.plot_results(main.add_summary(results), tmp_path)
    ax = next(a for a in figures[main.PLOT_FILES[2]].axes if a.get_title().startswith("Training memory by accounting"))
    bars = [b for b in ax.patches if b.get_width() == 0.6]  # the stacked parts, one bar per method and part
    trained = [m for m in results["summary"] if m != "base_on_task" and results["summary"][m]["status"] == "ok"]
    assert len(bars) == len(trained) * len(main.MEMORY_PARTS)
    for i, method in enumerate(trained):  # each stack adds up to the method's total, in MiB
        top = max(b.get_y() + b.get_height() for b in bars if abs(b.get_x() + 0.3 - i) < 1e-9)
        assert top == pytest.approx(results["summary"][method]["memory"]["total"] / 2**20)


def test_the_study_time_counts_every_run_once():
    results = fake_results()
    results["lr_grid"] = [{"method": "lora", "seed": 0, "rank": 8, "lr": 1e-3, "status": "ok", "train_time_s": 30.0},
                          {"method": "lora", "seed": 0, "rank": 8, "lr": 1.0, "status": "failed", "train_time_s": 5.0}]
    results["budget_check"] = [{"method": "lora", "seed": 0, "rank": 8, "epochs": 20, "status": "ok",
                                "train_time_s": 50.0}]
    lora0 = next(r for r in results["runs"] if (r["method"], r["seed"], r["rank"]) == ("lora", 0, 8))
    lora0["from_grid"] = True  # seed 0's LoRA run is the grid's run at 1e-3: trained once, counted once
    runs = sum(r["train_time_s"] for r in results["runs"]) - lora0["train_time_s"]
    assert main.study_time_s(results) == pytest.approx(30.0 + 5.0 + 50.0 + runs)


# ------------------------------------------------------------------------------------ the memory sweep
def sweep(points):
    """Memory-sweep records from {(width, batch): {method: total MiB}}."""
    return {"memory_sweep": [{"method": m, "width": w, "batch_size": b, "memory": {"total": mib * 2**20}}
                             for (w, b), totals in points.items() for m, mib in totals.items()]}


def test_the_crossover_is_the_largest_batch_still_under_full_fine_tuning():
    results = sweep({(1, 1): {"full": 2.0, "lora": 1.0, "dora": 3.0}, (1, 8): {"full": 3.0, "lora": 2.9, "dora": 4.0},
                     (1, 32): {"full": 5.0, "lora": 6.0, "dora": 6.0},
                     (4, 1): {"full": 40.0, "lora": 10.0, "dora": 12.0}, (4, 32): {"full": 50.0, "lora": 30.0,
                                                                                  "dora": 55.0}})
    table = main.crossover_table(results)
    assert "| LoRA | 8 | 32 (all swept) |" in table and "| DoRA (weight-decomposed) | none | 1 |" in table
    assert "| 1 | 8 | 3.00 | 2.90 (0.97x) | 4.00 (1.33x) |" in main.memory_sweep_table(results)
