"""Side by side: the dynamic-rank DoRA (Mao et al. 2024; main.py's DynamicRankLayer) and PEFT's AdaLoRA (Zhang et
al. 2023), its nearest relative in a well-kept library, on the same CNN, data, seeds, epochs and final rank budget.

    python main.py --seeds 3 --finetune-epochs 5 --lrs 1e-3,3e-3,1e-2 --budgets 10 --out-dir runs/mnist
    python tests/adalora_side_by_side.py runs/mnist            # writes runs/mnist/adalora.json, prints the table

The dynamic-rank DoRA's rows are the study's own runs. AdaLoRA trains here through main.train(), from each seed's
saved base of that study, with its data, data order, epochs, batch size and selection criterion; its rate comes from
the study's grid, grown past an end by the same rule (main.next_rate), judged on the first seed's validation set. It
starts with init_r = r' = ceil(1.5 r) and ends at target_r = r, its budget falling cubically over the same window as
ours (tinit, tfinal; an allocation step at each of our pruning steps), with our alpha (its scale alpha / init_r is
our alpha / r'). PEFT adds AdaLoRA's orthogonal regulariser only to a model output's .loss, which our CNN has not,
so it is added here as a train() hook, at PEFT's default weight 0.5. The time per epoch of both is measured side by
side in this process at the end (interleaved rounds), not taken from runs made at other times.
Not collected by pytest (no test_ prefix): PEFT stays a test-only dependency.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main  # noqa: E402

ORTH_REG_WEIGHT = 0.5  # PEFT's AdaLoraConfig default
LAYERS = ("conv1", "conv2", "fc1")  # what main.py adapts with the head trainable


class AdaLoRA(nn.Module):
    """PEFT's AdaLoRA model of a CNN, its budget allocation and orthogonal regulariser as main.train()'s hooks."""

    def __init__(self, base, rank, alpha, total_steps, schedule):
        from peft import AdaLoraConfig, get_peft_model
        super().__init__()
        start, end = schedule.window(total_steps)
        self.config = AdaLoraConfig(init_r=math.ceil(schedule.components * rank), target_r=rank, lora_alpha=alpha,
                                    target_modules=list(LAYERS), modules_to_save=[main.CNN.head],
                                    total_step=total_steps, tinit=start, tfinal=total_steps - end,
                                    deltaT=max(1, (end - start) // schedule.prune_steps))
        self.peft = get_peft_model(base, self.config)

    def forward(self, x):
        return self.peft(x)

    @classmethod
    def regularizer(cls, modules, step, total_steps):
        """mean ||A A^T - I||_F and ||B^T B - I||_F over the adapted layers, as AdaLoraModel.forward adds to .loss."""
        norms = [torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device))
                 for model in modules.values() for name, p in model.peft.named_parameters()
                 if "lora_A" in name or "lora_B" in name for cov in [p @ p.T if "lora_A" in name else p.T @ p]]
        return ORTH_REG_WEIGHT * torch.stack(norms).mean()

    @classmethod
    def on_step(cls, modules, step, total_steps):
        for model in modules.values():  # after the optimizer step, before the next zero_grad: it reads the gradients
            model.peft.base_model.update_and_allocate(step)

    @classmethod
    def settled_at(cls, modules, total_steps):
        return total_steps - next(iter(modules.values())).config.tfinal  # its budget final from here on

    def ranks(self):
        """Each adapted layer's final rank: the singular values AdaLoRA's mask left."""
        pattern = self.peft.peft_config["default"].rank_pattern  # {"conv1.lora_E.default": [kept?] * init_r, ...}
        return {layer: sum(map(bool, mask)) for layer in LAYERS for key, mask in pattern.items()
                if key.split(".")[0] == layer}

    def stored_params(self):
        """What a folder of the survivors would hold: per layer k (A row + B column + singular value), and the head."""
        sizes = {name: p.shape for name, p in self.peft.named_parameters() if "lora_A" in name or "lora_B" in name}
        per_component = {layer: sum(s[1] if "lora_A" in n else s[0] for n, s in sizes.items() if f".{layer}." in n) + 1
                         for layer in LAYERS}
        return sum(k * per_component[layer] for layer, k in self.ranks().items()) + 256 * 10 + 10


def study_context(study, data_dir):
    """The study's settings, data splits and results: what both methods share."""
    results = json.loads((study / "results.json").read_text())
    config = results["config"]
    args = main.parse_args(["--task", config["task"], "--seed", str(results["seeds"][0]), "--data-dir", str(data_dir)]
                           + (["--quick"] if config["quick"] else []))
    splits = main.load_splits(args, torch.device("cpu"))
    return results, config, splits[config["task"]]


def train_adalora(study, config, data, seed, lr):
    """One AdaLoRA run from the study's base of `seed`: (model, fit)."""
    schedule = main.DynamicRank(*(config[f"dyn_{k}"] for k in ("components", "prune_from", "prune_until",
                                                                "prune_steps", "beta", "dem")))
    epochs = main.epoch_budget(config)
    total = epochs * math.ceil(len(data["train"][1]) / config["batch_size"])
    torch.manual_seed(seed)
    base = main.load_plain(study / f"seed{seed}" / "base_model.pt", "cpu")
    model = AdaLoRA(base, config["rank"], config["alpha"], total, schedule).to(memory_format=torch.channels_last)
    fit = main.train(model, data, lr, main.Budget(epochs, config["batch_size"], config["patience"]), seed,
                     log=lambda line: print("  " + line, flush=True))
    return model, fit


def choose_rate(study, config, data, seed):
    """The study's grid for AdaLoRA on the first seed, grown by main.next_rate: (rate, its model, the grid runs)."""
    grid, runs, models = list(config["lrs"]), {}, {}
    while True:
        for lr in grid:
            if lr not in runs:
                print(f"AdaLoRA at lr {lr:g}, seed {seed} (grid, validation only)", flush=True)
                try:
                    models[lr], fit = train_adalora(study, config, data, seed, lr)
                    kept = fit["best_epoch"] - 1
                    runs[lr] = {"lr": lr, **main.stability(fit), "val_acc": fit["history"]["val_acc"][kept],
                                "val_loss": fit["history"]["val_loss"][kept], "train_time_s": fit["train_time_s"]}
                except main.Diverged as e:
                    runs[lr] = {"lr": lr, "status": "failed", "reason": str(e)}
        stable = sorted((r for r in runs.values() if r["status"] == "ok"), key=lambda r: r["lr"])
        best = max(stable, key=lambda r: main.selection_key(r["val_acc"], r["val_loss"]))
        beyond = main.next_rate(grid, best["lr"], config["lrs"])
        if beyond is None:
            return best["lr"], models[best["lr"]], sorted(runs.values(), key=lambda r: r["lr"])
        grid.append(beyond)


def epoch_seconds(study, config, data, rate, rounds=3, steps=60):
    """Seconds per epoch of the dynamic-rank DoRA and AdaLoRA, timed side by side: `steps` training steps of each,
    interleaved over rounds, the median scaled to a whole epoch."""
    seed, epoch_steps = 0, math.ceil(len(data["train"][1]) / config["batch_size"])
    short = {"train": tuple(t[:steps * config["batch_size"]] for t in data["train"]),
             "val": tuple(t[:1000] for t in data["val"])}
    samples = {"dyndora": [], "adalora": []}
    for _ in range(rounds):
        for method in samples:
            base = main.load_plain(study / f"seed{seed}" / "base_model.pt", "cpu")
            if method == "adalora":
                model = AdaLoRA(base, config["rank"], config["alpha"], steps, main.DynamicRank())
            else:
                model = main.add_adapters(base, main.DynamicRankLayer, main.AdapterConfig(config["rank"], config["alpha"]))
            model = model.to(memory_format=torch.channels_last)
            start = time.perf_counter()
            main.train(model, short, rate[method], main.Budget(1, config["batch_size"], None), seed, log=lambda s: None)
            samples[method].append((time.perf_counter() - start) * epoch_steps / steps)
    return {method: statistics.median(times) for method, times in samples.items()}


def main_script(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", type=Path, help="the out-dir of a main.py run with dyndora, --seeds and --lrs")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="as main.py's")
    p.add_argument("--table", action="store_true", help="train nothing: recompute the contrasts of study/adalora.json "
                                                        "from its runs and the study's results.json, and print them")
    parsed = p.parse_args(argv)
    study = parsed.study
    if parsed.table:
        results = json.loads((study / "results.json").read_text())
        out = json.loads((study / "adalora.json").read_text())
        out["vs"] = contrasts(results, out)
        (study / "adalora.json").write_text(json.dumps(out, indent=2))
        return print(table(results, out))
    results, config, data = study_context(study, parsed.data_dir)
    seeds = results["seeds"]
    rate, model, grid = choose_rate(study, config, data, seeds[0])
    runs = []
    for seed in seeds:
        if seed != seeds[0]:
            print(f"AdaLoRA at lr {rate:g}, seed {seed}", flush=True)
            model, _ = train_adalora(study, config, data, seed, rate)
        runs.append({"seed": seed, "test_acc": main.evaluate(model, *data["test"])[1], "ranks": model.ranks(),
                     "stored_params": model.stored_params(), "test_right": main.right_images(model, *data["test"])})
    dyn = main.ok_runs(main.main_runs(results), "dyndora")
    timing = epoch_seconds(study, config, data, {"adalora": rate, "dyndora": dyn[0]["lr"]})
    out = {"study": study.name, "date": time.strftime("%Y-%m-%d"), "device": main.environment(torch.device("cpu"), []),
           "config": {"init_r": math.ceil(main.DynamicRank().components * config["rank"]), "target_r": config["rank"],
                      "orth_reg_weight": ORTH_REG_WEIGHT, "epochs": main.epoch_budget(config)},
           "adalora": {"lr": rate, "grid": grid, "runs": runs, "summary": summary(runs)},
           "epoch_seconds_side_by_side": timing}
    out["vs"] = contrasts(results, out)
    (study / "adalora.json").write_text(json.dumps(out, indent=2))
    print(table(results, out))


def summary(runs):
    """Mean, std and 95 % CI over the seeds of what the table shows, kept in adalora.json beside the runs."""
    return {key: main.mean_std_ci(r[key] for r in runs) for key in ("test_acc", "stored_params")}


def dyn_runs(results, method):
    return [{"seed": r["seed"], "test_acc": r["test_acc"], "stored_params": r["stored_params"],
             "ranks": r["rank_allocation"]["ranks"], "test_right": r.get("test_right")}
            for r in main.ok_runs(main.main_runs(results), method)]


def contrasts(results, out):
    """{method: AdaLoRA minus it, paired seed by seed (main.paired_runs: seed and test-set noise)} for each
    dynamic-rank row the study ran."""
    adalora = {r["seed"]: r for r in out["adalora"]["runs"]}
    return {method: main.paired_runs([(adalora[r["seed"]], r) for r in runs if r["seed"] in adalora],
                                     results["config"]["test_size"])
            for method in ("dyndora", "dyndora_params") if (runs := dyn_runs(results, method))}


def table(results, out):
    """The README's table: the dynamic-rank DoRA's rows (at the component budget, and at LoRA's storage where the
    study ran it) and AdaLoRA's: test accuracy over the seeds, AdaLoRA minus each row seed by seed (seed and
    test-set noise), stored parameters, final ranks, time."""
    adalora = {r["seed"]: r for r in out["adalora"]["runs"]}
    rows = []
    for method in ("dyndora", "dyndora_params", "adalora"):
        runs = out["adalora"]["runs"] if method == "adalora" else dyn_runs(results, method)
        if not runs:
            continue
        stats = summary(runs)
        vs = main.fmt_ci(out["vs"][method], signed=True) if method in out.get("vs", {}) else "-"
        lr = out["adalora"]["lr"] if method == "adalora" else results["learning_rates"][method]["lr"]
        name = "AdaLoRA, PEFT" if method == "adalora" else f"{main.display(method)}, main.py"
        seconds = out["epoch_seconds_side_by_side"].get(method)
        rows.append([name, f"{lr:g}", f"{main.fmt_stat(stats['test_acc'])} {main.fmt_ci(stats['test_acc'])}", vs,
                     main.fmt_count(stats["stored_params"]),
                     "; ".join("/".join(str(r["ranks"][layer]) for layer in LAYERS) for r in runs),
                     "-" if seconds is None else f"{seconds:.1f}"])
    return main.table(["method", "lr", f"test acc (%), {len(adalora)} seeds, 95 % CI",
                       "AdaLoRA minus it (points, 95 % CI)", "stored params", "final rank conv1/conv2/fc1, per seed",
                       "s per epoch, side by side"], rows)


if __name__ == "__main__":
    main_script()
