"""Side-by-side speed of the usual MNIST pipeline and this project's, on the same model, batch and data.

    python tests/benchmark.py --data-dir data                  # one epoch each, then the full experiment (writes runs/benchmark.json)
    python tests/benchmark.py --data-dir data --max-steps 100  # a quick check: 100 steps each, no full run

(a) the usual pipeline: torchvision's MNIST with per-sample ToTensor + Normalize, a shuffling DataLoader (0 workers),
    contiguous NCHW tensors, batches copied to the device one by one -- what most MNIST scripts do;
(b) project: main.py's loop -- normalized tensors resident on the device, batches by index, channels-last;
(c) the whole default experiment (python main.py), its training time summed over methods.
Both (a) and (b) run one epoch of the base CNN (or --max-steps steps) with Adam and then one validation
pass over the same 5,000 held-out images. Then, always:
(d) a QLoRA training step as main.py takes it (W dequantized again in backward, nothing of its fp32 size kept) and
    as autograd would take it (the forward's dequantized W kept for backward), interleaved, at two CNN widths;
(e) what one point of the memory sweep costs (main.step_memory: a model's two steps, the second measured).
(f) with --recompute-cost FILE, only: LoRA's and DoRA's step time plain and with --recompute, side by side.
Not collected by pytest (no test_ prefix).
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main  # noqa: E402

BATCH_SIZE, SEED = main.SETTINGS["batch_size"][0], main.SETTINGS["seed"][0]


def usual_pipeline_epoch(data_dir, train_idx, val_idx, device, batch_size, steps, lr, seed):
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((main.MNIST_MEAN,), (main.MNIST_STD,))])
    full = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    train_loader = DataLoader(Subset(full, train_idx.tolist()), batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(Subset(full, val_idx.tolist()), batch_size=1000)
    torch.manual_seed(seed)
    model = main.CNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    main.sync(device)
    start = time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(train_loader):
        if step == steps:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    main.sync(device)
    return time.perf_counter() - start, 100 * correct / len(val_idx)


def project_epoch(data, device, batch_size, steps, lr, seed):
    splits = main.make_splits(data, device, "mnist", main.VAL_SIZE, seed, train_size=steps * batch_size)
    torch.manual_seed(seed)
    model = main.CNN().to(device).to(memory_format=torch.channels_last)
    main.sync(device)
    start = time.perf_counter()
    fit = main.train(model, splits, lr, main.Budget(1, batch_size, 1), seed, log=lambda s: None)
    main.sync(device)
    return time.perf_counter() - start, fit["history"]["val_acc"][-1]


def full_experiment_train_s(data_dir, device):
    with tempfile.TemporaryDirectory() as out:
        code = main.main(["--data-dir", str(data_dir), "--out-dir", out, "--device", device.type])
        if code != 0:
            raise SystemExit(f"the full experiment failed (exit code {code})")
        runs = json.loads((Path(out) / "results.json").read_text())["runs"]  # the default: one seed, no sweep
    return sum(r["train_time_s"] for r in runs), {r["method"]: r["train_time_s"] for r in runs}


def fresh(method, width, device):
    torch.manual_seed(SEED)
    model = main.finetuning_copy(main.CNN(width).to(device), method, main.SETTINGS["rank"][0], main.parse_args([]))
    return model.to(memory_format=torch.channels_last)


def step_ms(models, device, batch_size, rounds=5, steps=10):
    """Median ms of a training step of each {name: model}, timed in interleaved rounds (a busy moment hits all)."""
    x = torch.randn(batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    optimizers = {name: torch.optim.Adam(main.trainable_parameters(m).values(), lr=1e-3) for name, m in models.items()}
    times = {}
    for _ in range(rounds):
        for name, model in models.items():
            main.training_step(model, optimizers[name], {}, x, y, 1, 10)  # warm-up
            main.sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                main.training_step(model, optimizers[name], {}, x, y, 1, 10)
            main.sync(device)
            times.setdefault(name, []).append(1000 * (time.perf_counter() - start) / steps)
    return {name: sorted(ms)[len(ms) // 2] for name, ms in times.items()}


class KeepingFp32W(main.QLoRALayer):
    """QLoRA as autograd alone would train it: the forward's dequantized fp32 W kept for backward."""
    output = main.LoRALayer.output


def qlora_step_ms(device, width, batch_size):
    """QLoRA's step dequantizing W again in backward (QLoRALayer), and keeping the forward's fp32 W."""
    ours = fresh("qlora", width, device)
    autograd = fresh("qlora", width, device)
    for layer in main.adapter_layers(autograd).values():
        layer.__class__ = KeepingFp32W
    return step_ms({"dequantize again": ours, "keep fp32 W": autograd}, device, batch_size)


def recompute_step_ms(device, width, batch_size):
    """LoRA's and DoRA's steps plain and with --recompute (each adapter keeping its input only), side by side."""
    models = {}
    for method in ("lora", "dora"):
        for recompute in (False, True):
            model = fresh(method, width, device)
            for layer in main.adapter_layers(model).values():
                layer.recompute = recompute
            models[f"{method}{' recompute' if recompute else ''}"] = model
    return step_ms(models, device, batch_size)


def memory_point_s(device, width, batch_size):
    """Seconds one point of the memory sweep takes for every method (model built, two steps, the second measured)."""
    start = time.perf_counter()
    for method in main.COMPARED:
        main.step_memory(fresh(method, width, device), batch_size, 1000)
    return (time.perf_counter() - start) / len(main.COMPARED)


def recompute_cost(device, path):
    """(f) the step-time cost of --recompute: LoRA and DoRA, plain and recomputing, widths 1 and 8, batch 128."""
    result = {"device": main.environment(device, [])["device_name"], "torch": torch.__version__,
              "batch_size": BATCH_SIZE, "how": "median of 5 interleaved rounds of 10 steps, after a warm-up step",
              "date": time.strftime("%Y-%m-%d")}
    print("| width | method | plain (ms) | recomputing (ms) | ratio |\n|---|---|---:|---:|---:|")
    for width in (1, 8):
        ms = recompute_step_ms(device, width, BATCH_SIZE)
        result[f"width{width}"] = ms
        for method in ("lora", "dora"):
            plain, again = ms[method], ms[f"{method} recompute"]
            print(f"| {width} | {main.display(method)} | {plain:.1f} | {again:.1f} | {again / plain:.2f}x |")
    main.write_atomic(path, json.dumps(result, indent=2))
    print(f"\nwrote {path}")


def main_benchmark(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-steps", type=int, default=None, help="time this many steps instead of a whole epoch")
    p.add_argument("--data-dir", default=main.SETTINGS["data_dir"][0])
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--recompute-cost", metavar="FILE", help="only (f), written to FILE (e.g. plots/memory/...json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.recompute_cost:
        return recompute_cost(device, Path(args.recompute_cost))
    data = main.load_dataset(args.data_dir, download=False)
    train_idx, val_idx = main.split_indices(len(data["train"][1]), main.VAL_SIZE, SEED)
    full_steps = math.ceil(len(train_idx) / BATCH_SIZE)
    steps = min(args.max_steps or full_steps, full_steps)
    common = dict(device=device, batch_size=BATCH_SIZE, steps=steps, lr=main.BASE.lr, seed=SEED)

    print(f"{main.environment(device, [])['device_name']}: {steps} steps of batch {BATCH_SIZE} + validation "
          f"on {len(val_idx):,} images, base CNN, torch {torch.__version__}")
    usual_s, usual_acc = usual_pipeline_epoch(args.data_dir, train_idx, val_idx, **common)
    project_s, project_acc = project_epoch(data, **common)
    result = {"device": main.environment(device, [])["device_name"], "torch": torch.__version__, "steps": steps,
              "batch_size": BATCH_SIZE, "max_steps": args.max_steps,
              "seed_style_epoch_s": usual_s, "project_epoch_s": project_s, "ratio": usual_s / project_s,
              "seed_style_val_acc": usual_acc, "project_val_acc": project_acc}
    rows = [("(a) the usual DataLoader pipeline", f"{usual_s:.2f} s", f"{usual_acc:.2f} %"),
            ("(b) project pipeline", f"{project_s:.2f} s", f"{project_acc:.2f} %"),
            ("ratio (a) / (b)", f"{usual_s / project_s:.2f}x", "")]
    if args.max_steps is None:
        total, per_method = full_experiment_train_s(args.data_dir, device)
        result.update(full_experiment_train_s=total, full_experiment_train_s_per_method=per_method)
        rows.append(("(c) full default experiment, training time", f"{total:.1f} s",
                     ", ".join(f"{main.display(m)} {s:.1f} s" for m, s in per_method.items())))
    for width in (1, 8):
        ms = qlora_step_ms(device, width, BATCH_SIZE)
        result[f"qlora_step_ms_width{width}"] = ms
        rows.append((f"(d) QLoRA step, width {width}, batch {BATCH_SIZE}: dequantize again / keep fp32 W",
                     f"{ms['dequantize again']:.1f} / {ms['keep fp32 W']:.1f} ms",
                     f"{ms['dequantize again'] / ms['keep fp32 W']:.2f}x"))
    for width, batch in ((1, BATCH_SIZE), (8, 512)):
        seconds = memory_point_s(device, width, batch)
        result[f"memory_point_s_width{width}_batch{batch}"] = seconds
        rows.append((f"(e) one memory-sweep point per method, width {width}, batch {batch}", f"{seconds:.2f} s", ""))
    print("\n| pipeline | time | |\n|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main.write_atomic(out / "benchmark.json", json.dumps(result, indent=2))
    print(f"\nwrote {out / 'benchmark.json'}")


if __name__ == "__main__":
    main_benchmark()
