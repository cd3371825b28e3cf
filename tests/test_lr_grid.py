"""The learning rate per method: chosen on validation from a grid (never the test set), ties broken as the
README says; Fashion-MNIST as a fine-tuning task, with the same data checks as MNIST; the head-only baseline."""
import json
import math
import shutil
import urllib.error

import pytest
import torch

import main
from conftest import run


class NotToBeRead:
    """A test split that fails the test if anything reads it."""
    def __getitem__(self, key):
        raise AssertionError("the test set was read while choosing the learning rate")

    def __iter__(self):
        raise AssertionError("the test set was read while choosing the learning rate")


def grid_args(tmp_path, lrs):
    args = main.parse_args(["--quick", "--lrs", lrs, "--finetune-epochs", "1", "--out-dir", str(tmp_path)])
    main.check_args(args)
    return args


def context(args, splits=None, base=None):
    """A Run holding only what choosing a rate needs: settings, data, the first seed's base, empty results."""
    results = {"learning_rates": {}} | {kind: [] for kind in main.RECORD_KINDS}
    ctx = main.Run(args, torch.device("cpu"), splits or {}, results, earlier={})
    ctx.bases[args.seed] = base
    return ctx


def test_the_rate_is_chosen_on_validation_and_the_test_set_is_never_read(tmp_path, monkeypatch):
    monkeypatch.setattr(main, "save_results", lambda *a: None)
    monkeypatch.setattr(main, "MAX_EXTENSIONS", 0)  # the two rates alone (growing the grid is tested below)
    monkeypatch.setattr(main, "AT_CHANCE", 0)  # random labels: learning them is not the point
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    splits = {"mnist": {"train": (x[:64], y[:64]), "val": (x[64:], y[64:]), "test": NotToBeRead()}}
    ctx = context(grid_args(tmp_path, "1e-3,1e-1"), splits, main.CNN())
    lr, trained = main.choose_rate(ctx, "lora", 8)
    results = ctx.results
    grid = results["lr_grid"]
    assert [r["lr"] for r in grid] == [1e-3, 1e-1] and all("test_acc" not in r for r in grid)
    best = max(grid, key=lambda r: (r["val_acc"], -r["val_loss"]))
    chosen = results["learning_rates"]["lora"]
    assert lr == best["lr"] and chosen["chosen_by"] == "validation grid" and chosen["grid"] == [1e-3, 1e-1]
    assert chosen["runner_up"] == ({1e-3, 1e-1} - {lr}).pop() and chosen["extended"] == []
    assert trained[1]["history"]["val_acc"] == best["history"]["val_acc"]  # that very run is finished later


def test_ties_go_to_the_lower_validation_loss_then_the_lower_rate(tmp_path, monkeypatch):
    scripted = {1e-3: (90.0, 0.30), 3e-3: (92.0, 0.25), 1e-2: (92.0, 0.20), 3e-2: (92.0, 0.20), 1e-1: None}

    def run_method(ctx, record, trained=None):
        if scripted[record["lr"]] is None:
            return record | {"status": "failed", "reason": "diverged at epoch 1 (training loss nan)"}, None
        acc, loss = scripted[record["lr"]]
        return record | {"status": "ok", "val_acc": acc, "val_loss": loss, "best_epoch": 1, "val_right": "ff" * 5}, None
    monkeypatch.setattr(main, "run_method", run_method)
    monkeypatch.setattr(main, "save_results", lambda *a: None)
    ctx = context(grid_args(tmp_path, "3e-2,1e-2,3e-3,1e-3,1e-1"), {"mnist": {"val": (None, torch.zeros(40))}})
    lr, _ = main.choose_rate(ctx, "dora", 8)
    results = ctx.results
    assert lr == 1e-2  # 92 % thrice; of those, loss 0.20 twice; of those, the lower rate
    assert [r["status"] for r in results["lr_grid"]] == ["ok"] * 4 + ["failed"]


def test_without_a_grid_the_table_or_lr_sets_the_rate(tmp_path):
    ctx = context(grid_args(tmp_path, ""))
    assert main.choose_rate(ctx, "full", None) == (main.METHODS["full"].lr, None)
    assert ctx.results["learning_rates"]["full"] == {"lr": main.METHODS["full"].lr, "chosen_by": "METHODS"}
    ctx = context(main.parse_args(["--lr", "0.05"]))
    assert main.choose_rate(ctx, "lora", 8)[0] == 0.05
    assert ctx.results["learning_rates"]["lora"] == {"lr": 0.05, "chosen_by": "--lr"}


@pytest.mark.parametrize("argv, message", [
    (["--lrs", "1e-3,x"], "--lrs: numbers expected, separated by commas (got '1e-3,x')"),
    (["--lrs", "1e-3,0"], "--lrs must be a rate above 0 and at most 10 (got 0.0)"),
    (["--lrs", "inf"], "--lrs must be a rate above 0 and at most 10 (got inf)")])
def test_bad_grids_fail_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: pytest.fail("data was loaded despite bad input"))
    code, _, err = run(capsys, *argv, "--out-dir", tmp_path)
    assert code == 2 and message in err


def test_a_bad_rate_in_the_table_is_caught(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(main.METHODS, "dora", main.METHODS["dora"]._replace(lr=-1.0))
    code, _, err = run(capsys, "--out-dir", tmp_path)
    assert code == 2 and "METHODS['dora'].lr must be a rate above 0 and at most 10 (got -1.0)" in err


# ------------------------------------------------------------------------------------- Fashion-MNIST
def data_dir_with(tmp_path, mnist_dir, fashion=True):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MNIST").symlink_to(mnist_dir / "MNIST")
    if fashion:
        shutil.copytree(mnist_dir / "FashionMNIST", tmp_path / "data" / "FashionMNIST")
    return tmp_path / "data"


def test_missing_fashion_mnist_offline_is_one_clear_error(capsys, mnist_dir, tmp_path, monkeypatch):
    def offline(data_dir, name):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(main, "download_dataset", offline)
    data = data_dir_with(tmp_path, mnist_dir, fashion=False)
    code, _, err = run(capsys, "--quick", "--task", "fashion", "--data-dir", data, "--out-dir", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert f"FashionMNIST is missing from {data / 'FashionMNIST' / 'raw'}" in err and "download failed" in err
    assert all(name in err for name in main.DATASETS["FashionMNIST"])


def test_damaged_fashion_mnist_is_named_by_its_checksum(capsys, fashion_dir, tmp_path):
    data = data_dir_with(tmp_path, fashion_dir)
    victim = data / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x07")
    code, _, err = run(capsys, "--quick", "--task", "fashion", "--data-dir", data, "--out-dir", tmp_path / "out")
    assert code == 2 and "train-labels-idx1-ubyte is damaged or truncated (MD5 " in err


def test_fashion_mnist_downloads_through_torchvision_when_online(tmp_path, monkeypatch):
    import torchvision.datasets
    calls = []

    class FakeFashion:
        def __init__(self, root, train=True, download=False):
            calls.append(download)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashion)
    with pytest.raises(main.DataError, match="FashionMNIST is missing"):
        main.ensure_dataset(tmp_path, "FashionMNIST")
    assert calls == [True]


def test_real_fashion_mnist_loads_with_the_split_of_mnist(fashion_dir):
    data = main.load_dataset(fashion_dir, "FashionMNIST", download=False)
    assert data["train"][0].shape == (60_000, 1, 28, 28) and data["test"][0].shape == (10_000, 1, 28, 28)
    splits = main.make_splits(data, torch.device("cpu"), "fashion", val_size=1000, seed=0, train_size=2000)
    train_idx, val_idx = main.split_indices(60_000, 1000, 0)
    assert torch.equal(splits["val"][1], data["train"][1][val_idx])  # the same held-out indices as MNIST's


def test_the_grid_never_grows_past_the_largest_rate_allowed():
    assert main.next_rate([0.3, 1.0], 1.0, [0.3, 1.0]) == 3.0  # room below the bound: grows
    assert main.next_rate([1.0, 3.0], 3.0, [1.0, 3.0]) == 9.0  # at most 10
    assert main.next_rate([3.0, 10.0], 10.0, [3.0, 10.0]) is None  # 30 is beyond 10


# ------------------------------------------------------------------------ the end-to-end command
def test_quick_fashion_run_with_a_grid_runs_every_method(fashion_dir, tmp_path, capsys, monkeypatch):
    """python main.py --quick --task fashion --lrs 1e-3,1e-2 (one epoch each)"""
    code, stdout, _ = run(capsys, "--quick", "--task", "fashion", "--lrs", "1e-3,1e-2", "--epochs", "1",
                          "--finetune-epochs", "1", "--data-dir", fashion_dir, "--out-dir", tmp_path)
    assert code == 0
    results = main.add_summary(json.loads((tmp_path / "results.json").read_text()))
    main_runs = {r["method"]: r for r in results["runs"]}
    assert set(main_runs) == {"base", *main.COMPARED} and all(r["status"] == "ok" for r in main_runs.values())
    for method in main.COMPARED:  # the grid asked for, then steps past an end while the best rate sat there
        mine = [r for r in results["lr_grid"] if r["method"] == method]
        assert [r["lr"] for r in mine[:2]] == [1e-3, 1e-2] and all(r["extension"] for r in mine[2:])
    assert [r["method"] for r in results["lr_grid"]] == sorted((r["method"] for r in results["lr_grid"]),
                                                               key=list(main.COMPARED).index)
    for method in main.COMPARED:
        chosen = results["learning_rates"][method]
        assert chosen["chosen_by"] == "validation grid" and main_runs[method]["lr"] == chosen["lr"]
    assert results["learning_rates"]["base"] == {"lr": main.BASE.lr, "chosen_by": "BASE"}
    head = main_runs["head"]
    assert head["trainable_params"] == 256 * 10 + 10 and head["test_acc"] > 20  # the classifier alone learns
    assert results["summary"]["base_on_task"]["test_acc"]["mean"] < 30  # digits' features, clothes' labels
    assert (tmp_path / main.LR_PLOT).stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    assert "Learning-rate grid (seed 0" in table and "(chosen on validation from 0.001, 0.01" in table
    assert "| Head only |" in table and "Learning rates: " in table


# ------------------------------------------------------------- a grid that brackets its choice
def scripted_grid(monkeypatch, accuracy):
    """run_method answering a grid run from accuracy(lr): a number, "unstable" (collapsed) or None (diverged)."""
    tried = []

    def run_method(ctx, record, trained=None):
        tried.append(record["lr"])
        acc = accuracy(record["lr"])
        if acc is None:
            return record | {"status": "failed", "reason": "diverged at epoch 1 (training loss nan)"}, None
        status = {"status": "unstable", "reason": "collapsed"} if acc == "unstable" else {"status": "ok"}
        acc = 99.0 if acc == "unstable" else acc  # an unstable run may have been the best before it collapsed
        return record | {**status, "val_acc": acc, "val_loss": 1 - acc / 100, "best_epoch": 1,
                         "val_right": "ff" * 5}, None
    monkeypatch.setattr(main, "run_method", run_method)
    monkeypatch.setattr(main, "save_results", lambda *a: None)
    return tried


def test_the_grid_grows_past_its_top_until_the_next_rate_is_unstable(tmp_path, monkeypatch):
    tried = scripted_grid(monkeypatch, lambda lr: "unstable" if lr > 0.05 else 80 + 100 * lr)
    ctx = context(grid_args(tmp_path, "1e-3,3e-3,1e-2"), {"mnist": {"val": (None, torch.zeros(40))}})
    lr, _ = main.choose_rate(ctx, "lora", 8)
    assert tried == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and lr == 3e-2  # 1e-1 collapsed: not chosen, growth stops
    chosen = ctx.results["learning_rates"]["lora"]
    assert chosen["extended"] == [3e-2, 1e-1] and chosen["runner_up"] == 1e-2
    assert [r["extension"] for r in ctx.results["lr_grid"]] == [False] * 3 + [True] * 2


def test_the_grid_grows_past_its_bottom_at_most_three_steps(tmp_path, monkeypatch):
    tried = scripted_grid(monkeypatch, lambda lr: 90 - 100 * lr)  # ever better at lower rates
    ctx = context(grid_args(tmp_path, "1e-3,3e-3,1e-2"), {"mnist": {"val": (None, torch.zeros(40))}})
    lr, _ = main.choose_rate(ctx, "dora", 8)
    assert tried == [1e-3, 3e-3, 1e-2, 3e-4, 1e-4, 3e-5] and lr == 3e-5  # the limit reached, said in the record
    assert ctx.results["learning_rates"]["dora"]["extended"] == [3e-5, 1e-4, 3e-4]


def test_an_unstable_rate_is_never_chosen_however_high_its_kept_epoch(tmp_path, monkeypatch):
    scripted_grid(monkeypatch, lambda lr: "unstable" if lr == 3e-3 else 90.0 + lr)
    ctx = context(grid_args(tmp_path, "1e-3,3e-3,1e-2"), {"mnist": {"val": (None, torch.zeros(40))}})
    monkeypatch.setattr(main, "MAX_EXTENSIONS", 0)
    assert main.choose_rate(ctx, "lora", 8)[0] == 1e-2


def test_the_margin_over_the_runner_up_is_paired_image_by_image():
    class Echo(torch.nn.Module):  # predicts class 1 where the input is 1: right on those images, all labelled 1
        def forward(self, x):
            return torch.nn.functional.one_hot(x.long(), 2).float()

    def bits(right):
        return main.right_images(Echo(), torch.tensor(right), torch.ones(len(right), dtype=torch.long))
    a, b = bits([1, 1, 0, 0, 1, 1, 1, 0, 1]), bits([1, 0, 1, 0, 0, 1, 1, 0, 1])
    lead, se = main.paired_lead(a, b, 9)  # a alone right on images 1 and 4, b alone on image 2
    # the per-image differences +1, +1, -1 and six 0: their sample variance, over 9, times 9 images
    assert lead == 1 and se == pytest.approx(math.sqrt((3 - 1 / 9) / 8 / 9) * 9)
    assert main.paired_lead(a, a, 9) == (0, 0.0)
    rate = {"runner_up": 3e-3, "margin_images": 1, "margin_se": se}
    assert main.margin_cell(rate, 9) == "+1 ± 1.8 of 9 over 0.003 (within noise)"
