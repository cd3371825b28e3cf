"""The adapter layers' math, on small synthetic tensors, for nn.Linear and nn.Conv2d and every method."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main

METHODS = ["lora", "dora", "qlora"]
LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), lambda: torch.randn(5, 12)),
    # stride, padding and dilation all differ from the defaults, so lora_A must inherit them
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), lambda: torch.randn(2, 4, 9, 9)),
}


def make(method, kind, rank=2, alpha=4.0, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer_fn, x_fn = LAYERS[kind]
    base = layer_fn()
    wrapped = main.ADAPTERS[method](copy.deepcopy(base), rank, alpha, dropout)
    return base, wrapped, x_fn()


def perturb(layer, seed=1):
    """Give every trainable tensor a non-trivial value, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        if hasattr(layer, "magnitude"):
            layer.magnitude.mul_(1 + 0.3 * torch.rand(layer.magnitude.shape, generator=g))


def reference_weight(layer):
    """The paper formulas written out independently of the wrapper's code path."""
    w = layer.base_weight().detach()
    out = w.shape[0]
    delta = (layer.alpha / layer.rank) * (layer.lora_B.reshape(out, -1) @ layer.lora_A.reshape(layer.rank, -1))
    v = w + delta.reshape(w.shape)
    if isinstance(layer, main.DoRALayer):
        norms = torch.stack([torch.sqrt((v[i] ** 2).sum()) for i in range(out)])
        return (layer.magnitude / norms.detach()).reshape(out, *[1] * (w.dim() - 1)) * v
    return v


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_shapes_follow_peft_layout(method, kind):
    base, layer, _ = make(method, kind, rank=3)
    out, *rest = base.weight.shape
    if kind == "linear":
        assert layer.lora_A.shape == (3, base.in_features) and layer.lora_B.shape == (out, 3)
    else:
        assert layer.lora_A.shape == (3, *rest) and layer.lora_B.shape == (out, 3, 1, 1)
    assert layer.scaling == pytest.approx(4.0 / 3)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_wrapper_computes_the_base_layer(method, kind):
    base, layer, x = make(method, kind)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
def test_fresh_qlora_computes_the_dequantized_base(kind):
    base, layer, x = make("qlora", kind)
    torch.testing.assert_close(layer(x), layer.layer_op(x, layer.base_weight(), layer.bias), atol=1e-5, rtol=1e-5)
    # and the base itself up to 4-bit error: a few percent of the output scale, far from identical
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
    model = main.add_adapters(tiny_model(), method, rank=4, alpha=8, train_head=train_head)
    assert isinstance(model.conv1, main.ADAPTERS[method]) and isinstance(model.fc1, main.ADAPTERS[method])
    assert isinstance(model.fc2, nn.Linear) == train_head
    F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    adapter_names = ("lora_A", "lora_B", "magnitude")
    for name, p in model.named_parameters():
        should_train = name.split(".")[-1] in adapter_names or (train_head and name.startswith("fc2."))
        assert p.requires_grad == should_train, name
        assert (p.grad is not None) == should_train, name
    assert ("magnitude" in dict(model.named_parameters()).__repr__()) == (method == "dora")


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_move_the_output_away_from_the_base(method):
    base = tiny_model()
    model = main.add_adapters(copy.deepcopy(base), method, rank=4, alpha=8, train_head=False)
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
    # and nothing frozen moved
    for name, p in base.named_parameters():
        if name.startswith("fc2."):
            continue
        if method != "qlora":
            torch.testing.assert_close(model.get_parameter(name), p)


def test_add_adapters_rejects_unknown_methods_and_reports_max_rank():
    with pytest.raises(ValueError, match="unknown adapter method"):
        main.add_adapters(tiny_model(), "ia3", 4, 8)
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
        model = main.add_adapters(tiny_model(), method, rank=4, alpha=8).to(memory_format=torch.channels_last)
        assert model.conv1(x).is_contiguous(memory_format=torch.channels_last), method


def test_a_missing_bitsandbytes_is_reported_not_raised_as_import_error(monkeypatch):
    import sys
    main.import_bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` sees when it is not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    try:
        with pytest.raises(main.BitsAndBytesUnavailable, match="bitsandbytes cannot be imported"):
            main.QLoRALayer(nn.Linear(8, 4), 2, 4)
    finally:
        main.import_bitsandbytes.cache_clear()
