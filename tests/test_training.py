"""The training loop: early stopping restores the best weights; divergence is caught."""
import pytest
import torch

import main


def synthetic_splits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return {"train": (x, y), "val": (x[:16], y[:16]), "test": (x[:16], y[:16])}


def scripted(monkeypatch, epochs):
    """evaluate() answering (validation loss, accuracy) per epoch from a script, and each epoch's state."""
    script, states = iter(epochs), []

    def evaluate(model, images, labels, batch_size=1000):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(script)
    monkeypatch.setattr(main, "evaluate", evaluate)
    return states


def test_early_stopping_stops_and_restores_the_best_weights(monkeypatch):
    snapshots = scripted(monkeypatch, [(loss, 50.0) for loss in (1.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)])
    torch.manual_seed(0)  # 50 % every epoch: the lowest loss breaks the tie, epoch 2
    model = main.CNN()
    lines = []
    fit = main.train(model, synthetic_splits(), 1e-3, main.Budget(epochs=8, batch_size=16, patience=2), seed=0,
                     log=lines.append)
    assert fit["epochs_run"] == 4 and fit["best_epoch"] == 2  # epochs 3 and 4 without improvement
    assert lines[-1] == "Early stopping at epoch 4"
    assert lines[0].startswith("Epoch 1, Loss: ") and ", Learning Rate: 0.001000, Val Accuracy: 50.00%" in lines[0]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][key])
    assert not torch.equal(snapshots[1]["fc1.weight"], snapshots[3]["fc1.weight"])  # it did move on after
    assert len(fit["history"]["val_loss"]) == 4 and fit["optimizer_bytes"] > 0


def test_patience_zero_stops_at_the_first_epoch_without_improvement(monkeypatch):
    scripted(monkeypatch, [(1.0, 50.0), (1.1, 50.0), (0.5, 50.0)])
    fit = main.train(main.CNN(), synthetic_splits(), 1e-3, main.Budget(3, 32, 0), seed=0, log=lambda s: None)
    assert fit["epochs_run"] == 2 and fit["best_epoch"] == 1


def test_the_same_seed_gives_the_same_run(monkeypatch):
    monkeypatch.setattr(main, "AT_CHANCE", 0)  # random labels: nothing to learn, and that is not the point here
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(main.train(main.CNN(), synthetic_splits(), 1e-3, main.Budget(2, 16, 1), seed=0,
                               log=lambda s: None)["history"]["train_loss"])
    assert runs[0] == runs[1]


def test_a_huge_learning_rate_is_reported_as_divergence():
    torch.manual_seed(0)
    with pytest.raises(main.Diverged, match="diverged at epoch 1"):
        main.train(main.CNN(), synthetic_splits(), 1e30, main.Budget(2, 16, 1), seed=0, log=lambda s: None)


def test_a_finite_blow_up_is_divergence_too():
    main.check_divergence(1, 5.0, first_loss=2.3)  # worse than chance, but not exploded: no verdict yet
    with pytest.raises(main.Diverged, match=r"diverged at epoch 3 \(training loss 1.39e\+09, over 23"):
        main.check_divergence(3, 1.39e9, first_loss=0.5)
    with pytest.raises(main.Diverged, match="training loss nan"):
        main.check_divergence(2, float("nan"), first_loss=0.5)


def test_a_run_that_ends_at_chance_learned_nothing(monkeypatch):
    monkeypatch.setattr(main, "evaluate", lambda *a, **k: (2.3, 11.0))
    with pytest.raises(main.Diverged, match=r"learned nothing: 11.00 % validation accuracy .* chance \(10 %\)"):
        main.train(main.CNN(), synthetic_splits(), 1e-3, main.Budget(1, 32, 1), seed=0, log=lambda s: None)


def test_the_advice_names_alpha_only_when_it_was_raised():
    args = main.parse_args(["--lr", "0.5"])
    assert main.divergence_advice(("lora", 0, 8), 0.5, args) == "lower --lr (now 0.5)"
    args = main.parse_args(["--alpha", "1e6"])
    assert "--alpha (now 1e+06: every update is scaled by 125000)" in main.divergence_advice(
        ("dora", 0, 8), 0.01, args)
    assert "--alpha" not in main.divergence_advice(("full", 0, None), 0.01, args)


def test_cuda_peak_is_measured_above_what_every_method_shares(monkeypatch):
    """The CUDA-only arithmetic, on the CPU with torch.cuda's counters faked."""
    model = main.CNN()
    weights = main.weight_bytes(model)
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 10_000_000 + weights)  # dataset + this model
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 13_000_000)
    result, peak = main.with_cuda_peak(torch.device("cuda"), model, lambda: "trained")
    assert result == "trained" and peak == 3_000_000 and calls == ["sync", "reset", "sync"]
    assert main.with_cuda_peak(torch.device("cpu"), model, lambda: "trained") == ("trained", None)


class SmallBNNet(torch.nn.Module):
    """A model that is not ours: BatchNorm, whose running statistics are buffers that training moves."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 5)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def test_the_best_epochs_whole_state_is_restored_buffers_included(monkeypatch):
    states = scripted(monkeypatch, [(1.0, 50.0), (0.5, 50.0), (0.7, 50.0), (0.8, 50.0)])  # best: epoch 2 of 4
    torch.manual_seed(0)
    model = SmallBNNet()
    fit = main.train(model, synthetic_splits(), 1e-2, main.Budget(4, 16, 9), seed=0, log=lambda s: None)
    assert fit["epochs_run"] == 4 and fit["best_epoch"] == 2
    buffers = {name for name, _ in model.named_buffers()}
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= buffers
    for key, value in model.state_dict().items():  # parameters and buffers alike: epoch 2's
        torch.testing.assert_close(value, states[1][key], rtol=0, atol=0, msg=key)
    for key in ("bn.running_mean", "bn.num_batches_tracked", "fc.weight"):  # and they did move on after it
        assert not torch.equal(states[1][key], states[3][key]), key


class CountingLoRA(main.LoRALayer):
    """LoRA whose class hooks record their calls; its regulariser holds B near zero and adds a constant."""
    calls = []

    @classmethod
    def on_step(cls, layers, step, total_steps):
        cls.calls.append((sorted(layers), step, total_steps))

    @classmethod
    def regularizer(cls, layers, step, total_steps):
        return 1000.0 + 1e4 * sum(layer.lora_B.square().sum() for layer in layers.values())


def test_a_layer_classs_step_hook_and_regularizer_reach_the_training_loop(monkeypatch):
    monkeypatch.setattr(main, "AT_CHANCE", 0)  # random labels: nothing to learn, and that is not the point here
    splits = synthetic_splits()  # 64 images, batch 16: 4 steps an epoch, 3 epochs
    norms = {}
    for cls in (main.LoRALayer, CountingLoRA):
        torch.manual_seed(0)
        model = main.add_adapters(main.CNN(), cls, main.AdapterConfig(4, 8))
        CountingLoRA.calls.clear()
        fit = main.train(model, splits, 1e-2, main.Budget(3, 16, 9), seed=0, log=lambda s: None)
        norms[cls] = sum(layer.lora_B.norm() for layer in main.adapter_layers(model).values()).item()
        assert max(fit["history"]["train_loss"]) < 10  # the recorded loss is the task's alone, not + 1000
    assert CountingLoRA.calls == [(["conv1", "conv2", "fc1"], step, 12) for step in range(1, 13)]
    assert norms[CountingLoRA] < 0.05 * norms[main.LoRALayer]  # the term reached the loss: B held near zero


# ------------------------------------------------------------------- one selection criterion, collapse
def test_the_kept_epoch_is_the_best_by_accuracy_ties_going_to_the_lower_loss(monkeypatch):
    states = scripted(monkeypatch, [(0.40, 90.0), (0.45, 93.0), (0.30, 92.0), (0.41, 93.0), (0.50, 91.0)])
    model = main.CNN()
    fit = main.train(model, synthetic_splits(), 1e-3, main.Budget(5, 16, None), seed=0, log=lambda s: None)
    assert fit["epochs_run"] == 5 and fit["best_epoch"] == 4  # 93 % twice: the lower loss; not epoch 3's lowest loss
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, states[3][key])
    assert main.SELECTION == "validation accuracy (ties: the lower validation loss)"


def test_early_stopping_counts_epochs_without_a_better_one_by_that_criterion(monkeypatch):
    scripted(monkeypatch, [(0.9, 90.0), (0.5, 89.0), (0.4, 89.5), (0.3, 92.0)])  # loss falls, accuracy does not
    fit = main.train(main.CNN(), synthetic_splits(), 1e-3, main.Budget(4, 16, 2), seed=0, log=lambda s: None)
    assert fit["epochs_run"] == 3 and fit["best_epoch"] == 1  # stopped by accuracy, though the loss kept falling


def test_a_collapse_to_chance_after_learning_is_found_with_its_epoch():
    history = {"val_acc": [50.0, 94.16, 60.0, 10.02, 11.0], "train_loss": [1.0, 0.3, 0.5, 2.3, 2.3]}
    assert main.verdict(history, first_loss=2.3) == (4, 94.16)
    assert main.verdict({"val_acc": [50.0, 94.0, 20.0], "train_loss": [1, 1, 1]}, 2.3) is None  # low, not at chance
    with pytest.raises(main.Diverged, match="learned nothing"):
        main.verdict({"val_acc": [9.0, 12.0, 10.0], "train_loss": [2.3, 2.3, 2.3]}, 2.3)
    fitted = {"collapsed": (4, 94.16), "history": history}
    assert main.stability(fitted) == {"status": "unstable", "reason": "collapsed to 10.02 % validation accuracy at "
                                                                      "epoch 4, after 94.16 %"}
