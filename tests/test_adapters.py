"""The adapter layers' math, on small synthetic tensors, for nn.Linear and nn.Conv2d and every registered method."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main
from conftest import ADAPTER_METHODS, LAYERS, adapt, make, perturb

METHODS = ADAPTER_METHODS


def low_rank_update(layer):
    """(alpha/r) B @ A, written out from the tensors."""
    out = layer.weight_shape[0]
    return (layer.alpha / layer.rank) * (layer.lora_B.reshape(out, -1) @ layer.lora_A.reshape(layer.rank, -1))


def lora_weight(layer):
    w = layer.base_weight().detach()
    return w + low_rank_update(layer).reshape(w.shape)


def dora_weight(layer):
    v, out = lora_weight(layer), layer.weight_shape[0]
    norms = torch.stack([torch.sqrt((v[i] ** 2).sum()) for i in range(out)])
    return (layer.magnitude / norms.detach()).reshape(out, *[1] * (v.dim() - 1)) * v


def dynamic_rank_weight(layer):
    """W + (alpha/r') sum_i c_i B[:, i] A[i, :], component by component."""
    w, out = layer.base_weight().detach(), layer.weight_shape[0]
    B, A = layer.lora_B.reshape(out, -1), layer.lora_A.reshape(layer.rank, -1)
    update = sum(layer.gate[i] * torch.outer(B[:, i], A[i]) for i in range(layer.rank))
    return w + (layer.alpha / layer.rank) * update.reshape(w.shape)


REFERENCE = {  # the paper formulas, written out apart from the wrappers' code paths: one per adapter class
    main.LoRALayer: lora_weight, main.QLoRALayer: lora_weight, main.DoRALayer: dora_weight,
    main.DynamicRankLayer: dynamic_rank_weight}


def reference_weight(layer):
    return REFERENCE[type(layer)](layer)


def test_every_registered_adapter_class_has_a_reference_formula():
    assert {main.adapter_class(m) for m in METHODS} <= set(REFERENCE)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_shapes_follow_peft_layout(method, kind):
    """r components (the dynamic-rank DoRA: ceil(1.5 r) of them) in PEFT's layout, scaled by alpha over their
    number, and an update of exactly zero at init."""
    base, layer, _ = make(method, kind, rank=3)
    out, *rest = base.weight.shape
    r = math.ceil(1.5 * 3) if method == "dyndora" else 3
    assert layer.rank == r
    if kind == "linear":
        assert layer.lora_A.shape == (r, base.in_features) and layer.lora_B.shape == (out, r)
    else:
        assert layer.lora_A.shape == (r, *rest) and layer.lora_B.shape == (out, r, 1, 1)
    assert layer.scaling == pytest.approx(4.0 / r)
    assert torch.all(layer.delta_weight() == 0) and layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_fresh_wrapper_computes_the_base_layer(method, kind):
    """At init a wrapper computes exactly its stored base: the base itself, or for a 4-bit base the dequantized
    weight (and the base up to 4-bit error: a few percent of the output scale, far from identical)."""
    base, layer, x = make(method, kind)
    torch.testing.assert_close(layer(x), layer.layer_op(x, layer.base_weight(), layer.bias), atol=1e-5, rtol=1e-5)
    if layer.stored_weight_count() == 0:  # the fp32 weight itself is stored
        torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=1e-5)
    else:
        err = (layer(x) - base(x)).abs().max() / base(x).abs().max()
        assert 0 < err < 0.15


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_merged_weight_gives_the_wrapper_output(method, kind):
    _, layer, x = make(method, kind)
    perturb(layer)
    layer.eval()
    merged = layer.merged_weight()
    torch.testing.assert_close(layer.layer_op(x, merged, layer.bias), layer(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, reference_weight(layer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_match_the_paper_formula(method, kind):
    """Gradients of the wrapper equal those of the written-out formula; for DoRA that formula detaches
    the norm (paper section 4.3), so a wrapper that let gradients through the norm fails here."""
    _, layer, x = make(method, kind)
    perturb(layer)
    out = layer(x)
    ref = layer.layer_op(x, reference_weight(layer), layer.bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    target = torch.randn_like(out)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad((out * target).sum(), params)
    want = torch.autograd.grad((ref * target).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_a_trained_bias_gets_the_gradient_of_the_output_summed_per_unit(method, kind):
    """--bias lora_only/all: an adapted layer's b trains; y = ... + b, so dL/db is dL/dy summed over everything
    but the output unit (QLoRA's own backward included), and every other gradient is the formula's."""
    _, layer, x = make(method, kind)
    perturb(layer)
    layer.bias.requires_grad_(True)
    out = layer(x)
    target = torch.randn_like(out)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = dict(zip([id(p) for p in params], torch.autograd.grad((out * target).sum(), params)))
    by_hand = target.sum(dim=(0, 2, 3)) if kind == "conv" else target.sum(dim=0)
    torch.testing.assert_close(got[id(layer.bias)], by_hand, atol=1e-5, rtol=1e-5)
    ref = layer.layer_op(x, reference_weight(layer), layer.bias)
    want = torch.autograd.grad((ref * target).sum(), params)
    for p, w in zip(params, want):
        torch.testing.assert_close(got[id(p)], w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_the_bias_setting_trains_the_biases_peft_would_and_counts_them(bias):
    """PEFT's LoraConfig(bias=...): "lora_only" the adapted layers' biases, "all" every bias (here the same: the
    head trains whole either way); a trained bias is counted as trainable and stored (saved as PEFT keys it)."""
    model = main.add_adapters(main.CNN(), main.LoRALayer, main.AdapterConfig(4, 8, bias=bias), train_head=True)
    trained_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    adapted = {"conv1.bias", "conv2.bias", "fc1.bias"}
    assert trained_biases == ({"fc2.bias"} | (adapted if bias != "none" else set()))
    lora = 4 * (25 + 16) + 4 * (400 + 32) + 4 * (512 + 256)
    extra = (16 + 32 + 256) if bias != "none" else 0
    assert main.count_parameters(model)[0] == lora + 2570 + extra
    keys = set(main.peft_tensors(model))
    assert ("base_model.model.fc1.base_layer.bias" in keys) == (bias != "none")
    assert sum(t.numel() for t in main.peft_tensors(model).values()) == lora + 2570 + extra
    head_only = main.add_adapters(main.CNN(), main.LoRALayer, main.AdapterConfig(4, 8, bias="lora_only"),
                                  train_head=False)  # the head adapted too: its bias is an adapted layer's
    assert head_only.fc2.bias.requires_grad


@pytest.mark.parametrize("kind", LAYERS)
def test_dora_magnitude_starts_at_the_weight_norms(kind):
    base, layer, _ = make("dora", kind)
    w = base.weight.detach()
    norms = [math.sqrt(sum(float(v) ** 2 for v in w[i].flatten())) for i in range(w.shape[0])]
    torch.testing.assert_close(layer.magnitude.detach(), torch.tensor(norms), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
def test_dora_with_dropout_adapts_only_the_dropped_path(kind):
    """In training with dropout: y = W x + b + (W' - W) dropout(x); in eval, y = W' x + b."""
    _, layer, x = make("dora", kind, dropout=0.5)
    perturb(layer)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    x_drop = layer.dropout(x)
    w, w_new = layer.base_weight(), reference_weight(layer)
    want = layer.layer_op(x, w, layer.bias) + layer.layer_op(x_drop, w_new - w)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.layer_op(x, w_new, layer.bias), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", LAYERS)
def test_qlora_stores_the_base_in_4_bits_within_nf4_error(kind):
    base, layer, _ = make("qlora", kind)
    w = base.weight.detach()
    assert layer.weight_4bit.dtype == torch.uint8 and layer.weight_4bit.numel() == math.ceil(w.numel() / 2)
    assert not any(t.numel() >= w.numel() and t.is_floating_point()
                   for t in list(layer.parameters()) + list(layer.buffers())), "an fp32 copy of W was kept"
    assert layer.quant_state.quant_type == "nf4" and layer.quant_state.nested and layer.quant_state.blocksize == 64
    # NF4: every weight within half the widest gap between NF4 levels (-1 to -0.696: 0.152) times its
    # block's absmax, plus the small error of the double-quantized (8-bit) absmax itself
    flat, deq = w.flatten(), layer.base_weight().flatten()
    for start in range(0, flat.numel(), 64):
        block, approx = flat[start:start + 64], deq[start:start + 64]
        assert (block - approx).abs().max() <= 0.16 * block.abs().max() + 1e-6
    assert (deq - flat).abs().mean() < 0.1 * flat.abs().mean()


def tiny_model():
    torch.manual_seed(0)
    return main.CNN()


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_get_gradients(method, train_head):
    """In an adapted model the frozen W and b of every adapted layer get no gradient, and nothing outside the
    adapters does but the head (with train_head); every adapter tensor does."""
    model = adapt(tiny_model(), method, train_head=train_head)
    cls = main.adapter_class(method)
    assert isinstance(model.conv1, cls) and isinstance(model.fc1, cls) and isinstance(model.fc2, nn.Linear) == train_head
    for layer in main.adapter_layers(model).values():
        perturb(layer)  # off the init: a zero B (or gate) would hide a gradient path
    F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    adapted = main.adapter_layers(model)
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        should_train = (leaf not in ("weight", "bias")) if module in adapted else (train_head and module == "fc2")
        assert p.requires_grad == should_train, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == should_train, name
    assert ("magnitude" in dict(model.named_parameters()).__repr__()) == (method == "dora")


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_move_the_output_away_from_the_base(method):
    base = tiny_model()
    model = adapt(copy.deepcopy(base), method, train_head=False)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    base.eval(), model.eval()
    start = model(x).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert (model(x) - start).abs().max() > 1e-2
    # and nothing frozen moved (a 4-bit base holds no fp32 weight parameter to compare)
    params = dict(model.named_parameters())
    for name, p in base.named_parameters():
        if not name.startswith("fc2.") and name in params:
            torch.testing.assert_close(params[name], p)
    assert sum(name in params for name, _ in base.named_parameters()) >= (2 if method == "qlora" else 6)


def test_max_rank_is_the_smallest_min_in_out_of_the_adapted_layers():
    assert main.adapter_class("ia3") is None and main.adapter_class("full") is None
    # conv1 is 16 x (1*5*5): the smallest min(in, out) when the head (256 -> 10) stays fully trainable
    assert main.max_rank(tiny_model(), train_head=True) == 16
    assert main.max_rank(tiny_model(), train_head=False) == 10


def test_qlora_layer_follows_the_model_between_devices():
    layer = main.QLoRALayer(nn.Linear(64, 32), 2, 4)
    moved = copy.deepcopy(layer).to("cpu")
    assert moved.quant_state.absmax.device == moved.weight_4bit.device
    torch.testing.assert_close(moved.base_weight(), layer.base_weight())


def test_qlora_conv_keeps_channels_last_like_the_other_methods():
    """One input channel makes the layout ambiguous; a plain-strided dequantized weight made the conv
    return NCHW, and the pooling after it 4x slower."""
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    for method in METHODS:
        model = adapt(tiny_model(), method).to(memory_format=torch.channels_last)
        assert model.conv1(x).is_contiguous(memory_format=torch.channels_last), method


def test_a_missing_bitsandbytes_is_reported_not_raised_as_import_error(monkeypatch):
    import sys
    main.bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` sees when it is not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    try:
        with pytest.raises(main.BitsAndBytesUnavailable, match="bitsandbytes cannot be imported"):
            main.QLoRALayer(nn.Linear(8, 4), 2, 4)
    finally:
        main.bitsandbytes.cache_clear()


# ------------------------------------------------------------------ the dynamic-rank DoRA's schedule
def dynamic_layers(importances, rank=2):
    """{name: DynamicRankLayer} of Linear(8, 6) layers (r' = ceil(1.5 r) = 3 components) with given importances."""
    torch.manual_seed(0)
    layers = {}
    for name, values in importances.items():
        layers[name] = main.DynamicRankLayer(nn.Linear(8, 6), rank, 4.0)
        layers[name].importance.copy_(torch.tensor(values))
    return layers


def test_the_schedule_prunes_a_cubic_share_inside_its_window():
    schedule = main.DynamicRank()  # window 15 % to 50 % of the steps, 20 pruning steps
    assert schedule.window(1000) == (150, 500)
    assert [schedule.pruned_share(step, 1000) for step in (0, 150, 325, 500, 900)] == [0, 0, 0.125, 1, 1]
    steps = sorted(schedule.pruning_steps(1000))
    assert len(steps) == 20 and steps[0] == 150 + math.ceil(350 / 20) and steps[-1] == 500
    assert main.DynamicRank().window(1) == (0, 1)  # a one-step run still prunes to the budget
    layers = dynamic_layers({"a": [0.1, 0.2, 0.9], "b": [0.05, 0.5, 0.6], "c": [0.3, 0.35, 0.4]})
    main.DynamicRankLayer.prune(layers, 325, 1000)  # 3 layers x (3 - 2) = 3 to prune in all; 0.125 of 3 -> 0
    assert all(layer.alive.all() for layer in layers.values())
    main.DynamicRankLayer.prune(layers, 430, 1000)  # (280/350)^3 = 0.512 of 3 -> 1
    assert [int(layer.alive.sum()) for layer in layers.values()] == [3, 2, 3]


def test_one_threshold_over_all_layers_moves_the_rank_and_each_layer_keeps_one():
    layers = dynamic_layers({"a": [0.1, 0.2, 0.9], "b": [0.05, 0.5, 0.6], "c": [0.3, 0.35, 0.4],
                             "d": [0.01, 0.02, 0.03]})
    main.DynamicRankLayer.prune(layers, 500, 1000)  # the end: 4 x (3 - 2) = 4 pruned, the four lowest candidates
    assert {name: layer.alive.tolist() for name, layer in layers.items()} == {
        "a": [False, True, True], "b": [False, True, True], "c": [True, True, True], "d": [False, False, True]}
    # one threshold: every pruned candidate below every surviving one (d's last survives as its layer's floor)
    assert sum(int(layer.alive.sum()) for layer in layers.values()) == 4 * 2  # the average rank is r


def test_a_budget_in_parameters_prunes_until_the_survivors_store_no_more_than_lora():
    """--dyn-budget params: one threshold still, but pruning goes on until the components pruned free what
    r' - r components per layer would store above LoRA's r (a component: an A row and a B column)."""
    torch.manual_seed(0)
    small, big = main.DynamicRankLayer(nn.Linear(2, 3), 2, 4.0), main.DynamicRankLayer(nn.Linear(20, 10), 2, 4.0)
    layers = {"small": small, "big": big}
    small.importance.copy_(torch.tensor([0.1, 0.2, 0.9]))  # costs 2 + 3 = 5 each
    big.importance.copy_(torch.tensor([0.3, 0.4, 0.95]))   # 20 + 10 = 30 each
    main.DynamicRankLayer.prune(layers, 500, 1000)  # components: 2 of the 6, both small's: 5 + 90 stored
    assert [small.alive.tolist(), big.alive.tolist()] == [[False, False, True], [True, True, True]]
    for layer in layers.values():
        layer.alive.fill_(True)
        layer.schedule = main.DynamicRank(budget="params")
    main.DynamicRankLayer.prune(layers, 500, 1000)  # LoRA at r=2 stores 2 x 5 + 2 x 30 = 70; 105 at the start
    assert [small.alive.tolist(), big.alive.tolist()] == [[False, False, True], [False, True, True]]  # 65


@pytest.mark.parametrize("seed", range(5))
def test_the_parameter_budget_holds_on_the_cnn_for_any_importances(seed):
    args = main.parse_args(["--dyn-budget", "params"])
    model = main.add_adapters(main.CNN(), main.DynamicRankLayer, main.AdapterConfig(4, 8),
                              **main.DynamicRankLayer.options(args))
    layers = main.adapter_layers(model)
    g = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        layer.importance.copy_(torch.rand(layer.rank, generator=g) ** 4)
    main.DynamicRankLayer.prune(layers, 500, 1000)
    stored = sum(t.numel() for t in main.peft_tensors(model).values()) - 2570  # the head apart
    lora = main.count_parameters(main.add_adapters(main.CNN(), main.LoRALayer, main.AdapterConfig(4, 8)))[0] - 2570
    assert stored <= lora and all(layer.alive.sum() >= 1 for layer in layers.values())


def test_the_variance_regulariser_by_hand():
    layer = main.DynamicRankLayer(nn.Linear(3, 2), 2, 4.0)  # 3 components
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))  # row variances 1, 0, 0
        layer.lora_B.copy_(torch.tensor([[1.0, 0.0, 4.0], [3.0, 0.0, 0.0]]))  # column variances 2, 0, 8
    term = main.DynamicRankLayer.regularizer({"fc": layer}, step=10, total_steps=100)  # inside the window
    assert term.item() == pytest.approx(0.1 * (1 + 0 + 0 + 2 + 0 + 8) / 6)
    assert main.DynamicRankLayer.regularizer({"fc": layer}, step=51, total_steps=100) is None  # after it: off


def test_training_ends_at_rank_r_on_average_and_pruned_components_never_move_again(monkeypatch):
    monkeypatch.setattr(main, "AT_CHANCE", 0)  # random labels: learning them is not the point
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28), torch.randint(0, 10, (96,))
    splits = {"train": (x, y), "val": (x[:32], y[:32])}
    model = adapt(main.CNN(), "dyndora", rank=4)  # r' = 6 components in conv1, conv2, fc1
    layers = main.adapter_layers(model)
    snapshots = {}

    def after_the_window(cls, modules, step, total_steps, real=main.DynamicRankLayer.on_step.__func__):
        real(cls, modules, step, total_steps)
        if step == cls.settled_at(modules, total_steps):  # the window's last step: pruning is done
            snapshots.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    monkeypatch.setattr(main.DynamicRankLayer, "on_step", classmethod(after_the_window))
    main.train(model, splits, 1e-2, main.Budget(6, 16, 9), seed=0, log=lambda s: None)  # 36 steps: window 5..18
    ranks = {name: int(layer.alive.sum()) for name, layer in layers.items()}
    assert sum(ranks.values()) == 3 * 4 and min(ranks.values()) >= 1
    for name, layer in layers.items():
        dead = ~layer.alive
        assert dead.any() or ranks[name] == 6
        for tensor, index in ((layer.gate, (dead,)), (layer.lora_A, (dead,)), (layer.lora_B, (slice(None), dead))):
            assert torch.all(tensor[index] == 0)  # zeroed when pruned ...
        for leaf in ("gate", "lora_A", "lora_B"):  # ... and exactly as the window left them: no update afterwards
            now, then = getattr(layer, leaf), snapshots[f"{name}.{leaf}"]
            assert torch.equal(now[dead] if leaf != "lora_B" else now[:, dead],
                               then[dead] if leaf != "lora_B" else then[:, dead])
    lora = adapt(main.CNN(), "lora", rank=4)
    stored = sum(t.numel() for t in main.peft_tensors(model).values())
    sizes = {name: layer.lora_A[0].numel() + layer.weight_shape[0] for name, layer in layers.items()}  # in + out
    assert stored == sum(ranks[n] * sizes[n] for n in layers) + 256 * 10 + 10  # the survivors and the head
    for layer in layers.values():  # the same budget spread evenly: exactly LoRA's count at the same r
        layer.alive.copy_(torch.arange(6) < 4)
    assert sum(t.numel() for t in main.peft_tensors(model).values()) == main.count_parameters(lora)[0]
