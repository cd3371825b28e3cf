"""Interop: the adapter folders load in Hugging Face PEFT (a test-only dependency) and give our numbers."""
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import main


peft = pytest.importorskip("peft") if not __import__("os").environ.get("CI") else __import__("peft")


def trained(method, epochs=5, flags=()):
    """A base CNN and an adapted copy trained by main.train on fixed random images (a dynamic rank pruned to its
    budget on the way: 20 steps, the window from step 3 to 10), built as main.py's `flags` say."""
    torch.manual_seed(0)
    base = main.CNN()
    model = main.finetuning_copy(base, method, 4, main.parse_args(["--alpha", "8", *flags]))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, "AT_CHANCE", 0)  # random labels: learning them is not the point
        main.train(model, {"train": (x, y), "val": (x[:16], y[:16])}, 1e-2, main.Budget(epochs, 16, 99), 0,
                   log=lambda s: None)
    return base, model.eval()


def save(method, tmp_path, flags=()):
    base, model = trained(method, flags=flags)
    torch.save(base.state_dict(), tmp_path / "base_model.pt")
    folder = main.save_adapter(model, method, 4, main.parse_args(["--rank", "4", "--alpha", "8", *flags]),
                               tmp_path / "adapters" / f"{method}_r4")
    return model, folder


def peft_model(tmp_path, folder):
    base = main.CNN()
    base.load_state_dict(torch.load(tmp_path / "base_model.pt", weights_only=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base, folder).eval()
    assert not [w for w in caught if "config" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return loaded


@pytest.mark.parametrize("method", ["lora", "dora", "dyndora"])
def test_peft_loads_the_folder_and_gives_our_logits_and_our_merge(method, tmp_path):
    model, folder = save(method, tmp_path)
    assert model.conv1.lora_B.abs().sum() > 0  # trained: the update is not zero
    if method == "dyndora":  # pruned to rank 4 on average of 6 components, not evenly
        ranks = [int(layer.alive.sum()) for layer in main.adapter_layers(model).values()]
        assert sum(ranks) == 12 and ranks != [4, 4, 4]
    loaded = peft_model(tmp_path, folder)
    x = torch.randn(128, 1, 28, 28)
    with torch.inference_mode():
        ours, theirs = model(x), loaded(x)
        assert (ours - main.load_plain(tmp_path / "base_model.pt", "cpu").eval()(x)).abs().max() > 1e-3
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(x), main.merge_adapters(model)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, flags, bias", [("lora", ["--bias", "all"], "all"), ("dora", ["--bias", "lora_only"],
                                                  "lora_only"), ("lora_bias", [], "lora_only"),
                                                 ("dyndora", ["--dyn-budget", "params"], "none"),
                                                 ("dyndora_params", [], "none")])
def test_trained_biases_and_a_budget_in_parameters_load_in_peft_to_our_logits(method, flags, bias, tmp_path):
    """--bias (or the lora_bias row): the trained biases saved as PEFT keys them (<layer>.base_layer.bias), its
    bias field set; --dyn-budget params (or the dyndora_params row): the survivors store no more than LoRA at r,
    and load as LoRA + rank_pattern."""
    model, folder = save(method, tmp_path, flags)
    assert json.loads((folder / "adapter_config.json").read_text())["bias"] == bias
    x = torch.randn(64, 1, 28, 28)
    if bias != "none":
        assert (model.fc1.bias - main.load_plain(tmp_path / "base_model.pt", "cpu").fc1.bias).abs().max() > 1e-4
    else:
        stored = sum(t.numel() for t in main.peft_tensors(model).values())
        assert stored <= main.count_parameters(main.finetuning_copy(main.CNN(), "lora", 4, main.parse_args([])))[0]
    with torch.inference_mode():
        ours = model(x)
        torch.testing.assert_close(peft_model(tmp_path, folder)(x), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(main.load_adapter(tmp_path / "base_model.pt", folder).eval()(x), ours,
                                   atol=1e-5, rtol=0)


def test_peft_puts_the_qlora_adapter_on_the_fp32_base_as_our_loader_does(tmp_path):
    model, folder = save("qlora", tmp_path)
    loaded = peft_model(tmp_path, folder)
    on_fp32 = main.load_adapter(tmp_path / "base_model.pt", folder, method="lora").eval()
    x = torch.randn(128, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), on_fp32(x), atol=1e-5, rtol=0)
        # not the NF4 model: the base weights differ by the quantization error
        assert (on_fp32(x) - model(x)).abs().max() > 1e-4


def test_our_loader_reads_a_folder_peft_wrote(tmp_path):
    model, folder = save("dora", tmp_path)
    peft_folder = tmp_path / "written_by_peft"
    peft_model(tmp_path, folder).save_pretrained(peft_folder)
    reloaded = main.load_adapter(tmp_path / "base_model.pt", peft_folder).eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dyndora"])
def test_rslora_scaling_is_written_for_peft_and_loads_to_our_logits(method, tmp_path):
    """--scaling rslora: alpha / sqrt(r), PEFT's use_rslora (per layer for a dynamic rank's alpha_pattern)."""
    torch.manual_seed(0)
    base = main.CNN()
    torch.save(base.state_dict(), tmp_path / "base_model.pt")
    cls = main.adapter_class(method)
    args = main.parse_args(["--rank", "4", "--alpha", "8", "--scaling", "rslora"])
    model = main.add_adapters(copy.deepcopy(base), cls, main.AdapterConfig(4, 8, use_rslora=True),
                              **cls.options(args))
    for name, layer in main.adapter_layers(model).items():
        assert layer.scaling == pytest.approx(8 / layer.rank ** 0.5)
        with torch.no_grad():  # an update of a trained adapter's size: logits of a few units, not thousands
            layer.lora_B.normal_(std=0.02)
            if hasattr(layer, "gate"):
                layer.gate.normal_(std=0.5)
                layer.alive[:{"conv1": 1, "conv2": 3}.get(name, 0)] = False
                layer.hold_pruned()
    folder = main.save_adapter(model, method, 4, args, tmp_path / "adapters" / f"{method}_r4")
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    x = torch.randn(32, 1, 28, 28)
    with torch.inference_mode():
        ours = model.eval()(x)
        assert (ours - base.eval()(x)).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(peft_model(tmp_path, folder)(x), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(main.load_adapter(tmp_path / "base_model.pt", folder).eval()(x), ours,
                                   atol=1e-5, rtol=0)


def test_adalora_trains_through_our_loop_to_its_target_budget(monkeypatch):
    """tests/adalora_side_by_side.py's wrapper: PEFT's AdaLoRA driven by main.train()'s hooks ends at target_r per
    layer on average, its orthogonal regulariser in the loss, its ranks and stored count read back."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from adalora_side_by_side import AdaLoRA
    monkeypatch.setattr(main, "AT_CHANCE", 0)  # random labels: learning them is not the point
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = AdaLoRA(main.CNN(), 4, 8, total_steps=8, schedule=main.DynamicRank())  # init_r 6, target_r 4
    assert model.regularizer({"": model}, 1, 8).item() > 0
    main.train(model, {"train": (x, y), "val": (x[:16], y[:16])}, 1e-2, main.Budget(2, 16, None), 0,
               log=lambda s: None)
    ranks = model.ranks()
    assert set(ranks) == {"conv1", "conv2", "fc1"} and sum(ranks.values()) == 3 * 4
    assert model.stored_params() == sum(k * {"conv1": 25 + 16, "conv2": 400 + 32, "fc1": 512 + 256}[n] + k
                                        for n, k in ranks.items()) + 2570
