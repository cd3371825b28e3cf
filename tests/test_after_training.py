"""After training: merged layers and models (and the largest logit change merging makes), adapter-only files in
PEFT's layout, their reload."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import main
from conftest import ADAPTER_METHODS as METHODS, LAYERS, adapt, make, perturb


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_gives_a_plain_layer_with_the_same_output(method, kind):
    base, layer, x = make(method, kind)
    perturb(layer)
    layer.eval()
    plain = layer.merge()
    assert type(plain) is type(base) and not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-4)
    assert isinstance(layer, main.AdapterLayer) and layer.lora_B.abs().sum() > 0  # the adapter itself is kept


def trained_like(method, seed=0, train_head=True):
    """An adapted CNN as after training: every adapter tensor moved; a pruning method's first two components of
    each layer pruned (rank 4 of its 6), the head changed."""
    torch.manual_seed(seed)
    model = adapt(main.CNN(), method, train_head=train_head)
    for module in main.adapter_layers(model).values():
        perturb(module, seed=seed + 1)
        if hasattr(module, "alive"):
            module.alive[:2] = False
            module.hold_pruned()
    if train_head:
        with torch.no_grad():
            model.fc2.weight.add_(0.1)
    return model.eval()


@pytest.fixture(scope="module")
def real_batch(mnist_dir):
    return main.make_splits(main.load_dataset(mnist_dir, download=False), torch.device("cpu"))["test"][0][:500]


@pytest.mark.parametrize("method", METHODS)
def test_merged_model_agrees_with_the_adapted_model_on_real_images(method, real_batch):
    model = trained_like(method)
    merged = main.merge_adapters(model)
    assert not any(isinstance(m, main.AdapterLayer) for m in merged.modules())
    assert isinstance(merged.conv1, nn.Conv2d) and isinstance(merged.fc1, nn.Linear)
    with torch.inference_mode():
        torch.testing.assert_close(merged(real_batch), model(real_batch), atol=1e-4, rtol=1e-4)
    assert isinstance(model.conv1, main.AdapterLayer)  # out of place


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_adapter_folder_holds_only_the_trained_tensors_under_peft_names_and_shapes(method, train_head, tmp_path):
    from safetensors.torch import load_file
    model = trained_like(method, train_head=train_head)
    args = main.parse_args(["--rank", "4", "--alpha", "8"] + ([] if train_head else ["--no-train-head"]))
    folder = main.save_adapter(model, method, 4, args, tmp_path / "adapters" / f"{method}_r4")
    tensors = load_file(folder / "adapter_model.safetensors")
    expected = {"base_model.model.conv1.lora_A.weight": (4, 1, 5, 5), "base_model.model.conv1.lora_B.weight": (16, 4, 1, 1),
                "base_model.model.fc1.lora_A.weight": (4, 512), "base_model.model.fc1.lora_B.weight": (256, 4)}
    for key, shape in expected.items():
        assert tensors[key].shape == shape
    assert ("base_model.model.fc2.weight" in tensors) == ("base_model.model.fc2.bias" in tensors) == train_head
    assert ("base_model.model.fc2.lora_A.weight" in tensors) == (not train_head)
    assert ("base_model.model.conv2.lora_magnitude_vector" in tensors) == (method == "dora")
    if method == "dora":  # PEFT's shapes: a conv's magnitude [1, out, 1, 1], a Linear's [out]
        assert tensors["base_model.model.conv2.lora_magnitude_vector"].shape == (1, 32, 1, 1)
        assert tensors["base_model.model.fc1.lora_magnitude_vector"].shape == (256,)
    stored = sum(layer.weight_shape[0] * 4 + layer.lora_A[0].numel() * 4 + getattr(layer, "magnitude", torch.empty(0)).numel()
                 for layer in main.adapter_layers(model).values())  # rank 4 (survivors), B and A, DoRA's magnitude
    assert sum(t.numel() for t in tensors.values()) == stored + (2570 if train_head else 0)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_dora"] == (method == "dora") and config["bias"] == "none"
    assert config["target_modules"] == (["conv1", "conv2", "fc1"] + ([] if train_head else ["fc2"]))
    assert config["modules_to_save"] == (["fc2"] if train_head else None)
    assert not {"method", "task", "base_model", "base_quantization"} & set(config)  # PEFT would warn on them
    info = json.loads((folder / "training_info.json").read_text())
    assert info["method"] == method and ("base_quantization" in info) == (method == "qlora")
    if method == "dyndora":  # a rank per layer, and the alpha that keeps the scale alpha / r' = 8 / 6
        adapted = config["target_modules"]
        assert config["rank_pattern"] == dict.fromkeys(adapted, 4) and info["rank_allocation"]["components"] == 6
        assert config["alpha_pattern"] == pytest.approx(dict.fromkeys(adapted, 8 * 4 / 6))


@pytest.mark.parametrize("method", METHODS)
def test_reloaded_adapter_gives_the_same_predictions(method, tmp_path):
    torch.manual_seed(0)
    base = main.CNN()
    torch.save(base.state_dict(), tmp_path / "base_model.pt")
    model = adapt(copy.deepcopy(base), method)  # as the experiment builds it
    for name, module in main.adapter_layers(model).items():
        perturb(module, seed=5)
        if hasattr(module, "alive"):  # pruned unevenly: ranks 5, 4, 6 of 6
            module.alive[:{"conv1": 1, "conv2": 2}.get(name, 0)] = False
            module.hold_pruned()
    args = main.parse_args(["--rank", "4", "--alpha", "8"])
    folder = main.save_adapter(model, method, 4, args, tmp_path / "adapters" / f"{method}_r4")
    reloaded = main.load_adapter(tmp_path / "base_model.pt", folder).eval()
    cls = main.adapter_class(method)
    assert type(reloaded.conv1) is (cls.loads_as or cls)  # a pruned dynamic rank is a plain LoRA, rank per layer
    assert [m.rank for m in main.adapter_layers(reloaded).values()] == (
        [5, 4, 6] if method == "dyndora" else [4, 4, 4])
    x = torch.randn(32, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), model.eval()(x))
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert size < 0.15 * (tmp_path / "base_model.pt").stat().st_size


def test_loading_an_adapter_into_the_wrong_model_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    torch.save(main.CNN().state_dict(), tmp_path / "base_model.pt")
    folder = main.save_adapter(trained_like("lora"), "lora", 4, main.parse_args(["--rank", "4", "--alpha", "8"]),
                               tmp_path / "lora_r4")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors.pop("base_model.model.fc1.lora_B.weight")
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(main.ModelFileError, match="missing .*fc1.lora_B.weight"):
        main.load_adapter(tmp_path / "base_model.pt", folder)


@pytest.mark.parametrize("method", ["lora", "dora", "dyndora", "qlora"])
def test_the_merge_gap_is_the_largest_logit_change_merging_makes(method):
    torch.manual_seed(0)
    model, images = trained_like(method).eval(), torch.randn(50, 1, 28, 28)
    with torch.no_grad():
        expected = (model(images) - main.merge_adapters(model)(images)).abs().max().item()
    assert main.merge_gap(model, images) == expected and 0 <= expected < 1e-3
