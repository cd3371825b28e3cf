"""The training loop: early stopping restores the best weights; divergence is caught; training memory by accounting,
checked against counts by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

import main
from conftest import ADAPTER_METHODS, LAYERS, make, perturb


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
    assert len(fit["history"]["val_loss"]) == 4 and fit["memory"]["optimizer"] > 0


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


def test_a_validation_loss_that_is_not_finite_is_divergence_never_a_number_recorded(monkeypatch):
    scripted(monkeypatch, [(0.5, 60.0), (float("nan"), 10.0)])
    with pytest.raises(main.Diverged, match=r"diverged at epoch 2 \(validation loss nan\)"):
        main.train(main.CNN(), synthetic_splits(), 1e-3, main.Budget(3, 32, None), seed=0, log=lambda s: None)


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


# ------------------------------------------------------------------- training memory, by accounting
def kept_for_backward(module, x, forward=None):
    """The bytes TrainingMemory counts as kept for backward when backward begins, one pass of `module` on `x`."""
    trainable = [p for p in module.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True)]
    memory = main.TrainingMemory(module, torch.optim.Adam(trainable), torch.device("cpu"))
    with memory:
        (forward or module)(x).sum().backward()
    return memory.kept_at_backward


F32, I64 = 4, 8  # bytes per value
LINEAR_X, CONV_X = 5 * 12 * F32, 2 * 4 * 9 * 9 * F32  # conftest.LAYERS' inputs: [5, 12] and [2, 4, 9, 9]
CONV_OUT = 2 * 5 * 5  # that conv's output, per channel: 9x9, kernel 3, stride 2, padding 2, dilation 2 -> 5x5
# What each layer keeps for backward, worked out from its gradients with rank r = 2 (the dynamic rank: r' = 3
# components). A gradient to a frozen weight is never needed, and a parameter or buffer is weight, not activation.
BY_HAND = {
    # dA needs x; dB needs h = A x; dh needs (alpha/r) B, a new tensor [out, r]
    ("lora", "linear"): LINEAR_X + 5 * 2 * F32 + 8 * 2 * F32,
    ("lora", "conv"): CONV_X + 2 * CONV_OUT * F32 + 6 * 2 * F32,
    # LoRA's, plus for the magnitude's gradient the unscaled output (W + dW) x [batch, out] and for the output's the
    # scale s = m / ||W + dW|| [out], and for m's gradient the (detached) norm [out]
    ("dora", "linear"): LINEAR_X + 5 * 2 * F32 + 8 * 2 * F32 + 5 * 8 * F32 + 8 * F32 + 8 * F32,
    ("dora", "conv"): CONV_X + 2 * CONV_OUT * F32 + 6 * 2 * F32 + 6 * CONV_OUT * F32 + 6 * F32 + 6 * F32,
    # LoRA's at r' = 3, plus the scaled gates (alpha/r') c [r'] that B is multiplied by (dB needs them)
    ("dyndora", "linear"): LINEAR_X + 5 * 3 * F32 + 8 * 3 * F32 + 3 * F32,
    ("dyndora", "conv"): CONV_X + 2 * 3 * 25 * F32 + 6 * 3 * F32 + 3 * F32,
    # LoRA's exactly: W x + b through FrozenQuantized keeps nothing, not the dequantized W
    ("qlora", "linear"): LINEAR_X + 5 * 2 * F32 + 8 * 2 * F32,
    ("qlora", "conv"): CONV_X + 2 * CONV_OUT * F32 + 6 * 2 * F32,
}


def test_plain_layers_keep_what_their_gradients_need():
    layer_fn, x_fn = LAYERS["linear"]
    assert kept_for_backward(layer_fn(), x_fn()) == LINEAR_X  # dW needs x
    frozen = layer_fn().requires_grad_(False)  # dx needs W alone: a parameter
    assert kept_for_backward(frozen, x_fn().requires_grad_(True)) == 0
    layer_fn, x_fn = LAYERS["conv"]
    assert kept_for_backward(layer_fn(), x_fn()) == CONV_X
    x = torch.randn(2, 6, 8, 8, requires_grad=True)  # ReLU keeps its output; max-pool that same tensor + indices
    relu_pool = lambda x: F.max_pool2d(F.relu(x), 2)  # noqa: E731
    assert kept_for_backward(torch.nn.Linear(1, 1), x, relu_pool) == 2 * 6 * 8 * 8 * F32 + 2 * 6 * 4 * 4 * I64


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_each_adapter_keeps_what_its_gradients_need(method, kind):
    if (method, kind) not in BY_HAND:
        pytest.skip(f"{method} has no count by hand here: add one to BY_HAND")
    _, layer, x = make(method, kind)
    assert kept_for_backward(layer, x) == BY_HAND[method, kind]
    assert kept_for_backward(layer, x.requires_grad_(True)) == BY_HAND[method, kind]  # x is kept once, for both


def default_cnn_by_hand(batch, method):
    """What the default CNN keeps for backward in one training step (channels-last, dropout 0.25 on CPU, whose
    mask is a float32 tensor), full fine-tuning or LoRA at r = 8, worked out layer by layer."""
    b = batch
    full = (b * 1 * 28 * 28 * F32            # conv1's input: its weight's gradient needs it
            + b * 16 * 24 * 24 * F32         # ReLU's output, which max-pool keeps too (one storage)
            + b * 16 * 12 * 12 * I64         # max-pool's indices
            + b * 16 * 12 * 12 * F32         # conv2's input
            + b * 32 * 8 * 8 * F32 + b * 32 * 4 * 4 * I64  # ReLU and max-pool again
            + b * 512 * F32                  # fc1's input (the flattened channels-last tensor, a copy)
            + b * 256 * F32                  # ReLU's output
            + 2 * b * 256 * F32              # dropout's mask, and its output (fc2's input)
            + b * 10 * F32 + b * I64 + F32)  # log-softmax's output, the labels, the loss's weight sum
    if method == "full":
        return full
    # LoRA: the same inputs (now for the A's), plus h = A x of every layer and each (alpha/r) B
    return full + b * (8 * 24 * 24 + 8 * 8 * 8 + 8) * F32 + (16 * 8 + 32 * 8 + 256 * 8) * F32


def fresh(method, width=1, rank=8):
    torch.manual_seed(0)
    return main.finetuning_copy(main.CNN(width), method, rank, main.parse_args([])).to(
        memory_format=torch.channels_last)


def test_the_default_cnn_at_batch_128_keeps_what_a_count_by_hand_says():
    parts = {m: main.step_memory(fresh(m), 128, 100) for m in ("full", "lora")}
    for method, memory in parts.items():
        assert memory.kept_at_backward == default_cnn_by_hand(128, method), method
        assert memory.parts["activations"] == memory.kept_at_backward  # the peak: as backward begins
    parts = {m: memory.parts for m, memory in parts.items()}
    assert 10 * 2**20 < parts["full"]["activations"] < 10.5 * 2**20  # about 10 MiB; LoRA about 1.25x that
    assert parts["lora"]["activations"] / parts["full"]["activations"] == pytest.approx(1.24, abs=0.01)


@pytest.mark.parametrize("method", ["full", "head", *ADAPTER_METHODS])
def test_the_parts_add_up_and_weights_count_as_stored(method):
    model = fresh(method)
    measured = main.step_memory(model, 16, 100)
    memory, trainable = measured.parts, sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert memory["trainable_weights"] == sum(measured.grads.values()) == F32 * trainable  # every gradient written
    assert memory["gradients"] <= F32 * trainable and memory["activations"] <= measured.kept_at_backward
    assert measured.peak > memory["frozen_weights"] + memory["trainable_weights"] + memory["optimizer"]
    assert memory["frozen_weights"] + memory["trainable_weights"] == main.weight_bytes(model)
    n_tensors = sum(p.requires_grad for p in model.parameters())
    assert memory["optimizer"] == 2 * F32 * trainable + F32 * n_tensors  # Adam: two moments and a step count each
    if method == "qlora":  # the adapted layers' W as packed 4-bit codes and their constants: 13.5 % of fp32
        frozen_w = sum(m.frozen_weight_bytes() for m in main.adapter_layers(model).values())
        fp32_w = sum(F32 * math.prod(m.weight_shape) for m in main.adapter_layers(model).values())
        assert frozen_w < 0.14 * fp32_w
        assert memory["frozen_weights"] == frozen_w + sum(b.nbytes for n, b in model.named_parameters()
                                                          if not b.requires_grad)  # + the frozen biases


@pytest.mark.parametrize("width", [1, 2])
def test_qlora_keeps_for_backward_what_lora_keeps_and_saves_the_frozen_weights(width):
    lora, qlora = (main.step_memory(fresh(m, width), 32, 100).parts for m in ("lora", "qlora"))
    assert qlora["activations"] == lora["activations"]  # nothing of W's fp32 size
    assert lora["total"] - qlora["total"] == lora["frozen_weights"] - qlora["frozen_weights"] > 0


def test_qlora_outputs_and_gradients_equal_dequantizing_once_and_keeping_w():
    for kind in LAYERS:
        _, layer, x = make("qlora", kind)
        perturb(layer)
        results = []
        for forward in (main.QLoRALayer.forward, main.LoRALayer.forward):  # LoRA's: autograd keeps the fp32 W
            x_in = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = forward(layer, x_in)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append([y.detach(), x_in.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()])
        for ours, kept_w in zip(*results):
            torch.testing.assert_close(ours, kept_w, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["full", "head", *ADAPTER_METHODS])
def test_a_run_measures_its_own_step_as_step_memory_does_and_trains_the_same(method, monkeypatch):
    """train() measures step MEMORY_STEP of the run itself; step_memory (the sweep, older results) a fresh model of
    the same shapes: the same bytes. And measuring changes nothing of the training."""
    monkeypatch.setattr(main, "AT_CHANCE", 0)  # random labels: nothing to learn, and that is not the point here
    splits, fits = synthetic_splits(), []
    for step in (0, main.MEMORY_STEP):  # step 0 never comes: not measured; then as every run is
        monkeypatch.setattr(main, "MEMORY_STEP", step)
        fits.append(main.train(fresh(method), splits, 1e-3, main.Budget(1, 16, None), seed=0, log=lambda s: None))
    assert fits[0]["history"]["train_loss"] == fits[1]["history"]["train_loss"]
    assert main.step_memory(fresh(method), 16, total_steps=4).parts == fits[1]["memory"]  # 64 images: 4 steps


def test_the_cuda_peak_is_read_over_the_measured_step_above_what_was_there_before(monkeypatch):
    """The CUDA-only arithmetic, on the CPU with torch.cuda's counters faked."""
    model = fresh("lora")
    weights, calls = main.weight_bytes(model), []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10_000_000 + weights)  # dataset + model
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 25_000_000)
    optimizer = torch.optim.Adam(main.trainable_parameters(model).values())
    memory = main.TrainingMemory(model, optimizer, torch.device("cuda"))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with memory:
        main.training_step(model, optimizer, {}, x, y, 1, 10)
    assert memory.peak == 15_000_000 and calls == ["sync", "reset", "sync"]  # weights + the rise above the start
    assert memory.parts["activations"] > 0  # the accounting beside it, never replaced by it


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


# ------------------------------------------------------------------ memory measured, and saved by recomputing
def test_the_cpu_peak_sees_a_tensor_of_known_size_allocated_inside_the_step():
    """torch.profiler's allocation events, summed in time order: 40 MB allocated and freed inside the step raise the
    measured peak by those 40 MB (within the step's own small transients), and not the accounting."""
    def step_with(extra):
        model = fresh("lora")
        optimizer = torch.optim.Adam(main.trainable_parameters(model).values())
        x, y = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (8,))
        main.training_step(model, optimizer, {}, x, y, 1, 10)
        with main.TrainingMemory(model, optimizer, torch.device("cpu")) as memory:
            big = torch.ones(extra // 4)  # alive through the whole step
            main.training_step(model, optimizer, {}, x, y, 2, 10)
            del big
        return memory
    plain, with_big = step_with(4), step_with(40_000_000)
    assert with_big.peak - plain.peak == pytest.approx(40_000_000, abs=2**16)
    assert with_big.parts == plain.parts and plain.peak > plain.parts["total"]


def test_zero_grad_first_trains_exactly_as_zero_grad_after_the_forward_pass():
    """training_step frees last step's gradients before the forward pass; the step's arithmetic is the same as
    the loop that zeroed them after it (a reference written here), bit for bit."""
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ours, reference = fresh("lora"), fresh("lora")
    opt_ours, opt_ref = (torch.optim.Adam(main.trainable_parameters(m).values(), lr=1e-2) for m in (ours, reference))
    for step in range(1, 4):
        torch.manual_seed(step)  # the CNN's dropout draws the same mask in both
        main.training_step(ours, opt_ours, main.hook_groups(ours), x, y, step, 3)
        torch.manual_seed(step)
        loss = F.cross_entropy(reference(x), y)
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()
    for (name, p), q in zip(main.trainable_parameters(ours).items(), main.trainable_parameters(reference).values()):
        assert torch.equal(p, q), name


def test_the_accounting_counts_what_coexists_at_the_peak_not_every_part_at_once():
    """One image through a wide CNN: the gradients (8 MiB of fc1's) outgrow what autograd keeps, so the peak is
    where backward has written them and freed most of the activations; the parts are those at that moment."""
    model = fresh("full", width=4)
    memory = main.step_memory(model, 1, 100)
    grads = sum(memory.grads.values())
    assert memory.parts["gradients"] > memory.parts["activations"] and memory.parts["activations"] < memory.kept_at_backward
    assert memory.parts["gradients"] + memory.parts["activations"] < grads + memory.kept_at_backward  # not both whole
    assert memory.parts["gradients"] + memory.parts["activations"] >= max(grads, memory.kept_at_backward)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_recomputing_gives_the_plain_outputs_and_gradients_and_keeps_only_the_input(method, kind):
    """--recompute: KeepInput keeps x alone and its backward (each class's recomputed_grads, written apart from
    autograd's own path) gives the gradients autograd gives the plain layer: x, A, B, the gates, DoRA's
    magnitude, and a trained bias."""
    results, saved = [], []
    for recompute in (False, True):
        _, layer, x = make(method, kind)
        perturb(layer)
        layer.bias.requires_grad_(True)
        layer.recompute = recompute
        x = x.requires_grad_(True)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad.clone() for p in main.trainable_parameters(layer).values()])
        saved.append({k: v.shape for k, v in layer.peft_tensors().items()})
        if recompute:
            assert kept_for_backward(layer, x.detach()) == x.nbytes  # the input only
    assert saved[0] == saved[1]  # its saved folder: the same tensors
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_the_generic_recomputed_backward_a_new_class_inherits_gives_each_class_s_own(method, kind):
    """AdapterLayer.recomputed_grads (output(x) again, differentiated by autograd) is what a class written straight
    on AdapterLayer gets: it agrees with every class's own hand-written backward."""
    _, layer, x = make(method, kind)
    perturb(layer)
    layer.bias.requires_grad_(True)
    x = x.requires_grad_(True)
    grad_out = torch.linspace(-1, 1, layer(x).numel()).view_as(layer(x))
    params = tuple(main.trainable_parameters(layer).values())
    ours_x, ours = type(layer).recomputed_grads(layer, x, grad_out, params)
    generic_x, generic = main.AdapterLayer.recomputed_grads(layer, x, grad_out, params)
    for a, b in zip([ours_x, *ours], [generic_x, *generic]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recomputing_keeps_what_full_fine_tuning_keeps_and_less_in_all():
    for method in ADAPTER_METHODS:
        plain, recomputing = (main.step_memory(main.finetuning_copy(main.CNN(), method, 8, main.parse_args(
            ["--recompute"] * flag)).to(memory_format=torch.channels_last), 64, 100) for flag in (0, 1))
        full = main.step_memory(fresh("full"), 64, 100)
        assert recomputing.kept_at_backward == full.kept_at_backward < plain.kept_at_backward, method
        assert recomputing.parts["total"] < full.parts["total"], method


def test_recompute_with_dropout_is_refused_in_one_sentence(capsys, tmp_path):
    from conftest import run
    code, _, err = run(capsys, "--recompute", "--dropout", "0.1", "--out-dir", tmp_path / "out")
    assert code == 2 and "--recompute needs --dropout 0" in err and err.count("\n") == 1
