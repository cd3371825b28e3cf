"""Data: the seeded split, the data order, the MNIST download/offline/checksum logic, the resident tensors."""
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

import main


def test_split_sizes_disjoint_and_deterministic():
    train, val = main.split_indices(60_000, 5_000, seed=0)
    assert len(train) == 55_000 and len(val) == 5_000
    assert len(set(train.tolist()) | set(val.tolist())) == 60_000  # disjoint and covering
    again_train, again_val = main.split_indices(60_000, 5_000, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, main.split_indices(60_000, 5_000, seed=1)[1])


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(main.epoch_order(1000, 0, 3), main.epoch_order(1000, 0, 3))
    assert not torch.equal(main.epoch_order(1000, 0, 3), main.epoch_order(1000, 0, 4))
    assert sorted(main.epoch_order(1000, 0, 3).tolist()) == list(range(1000))


def fake_mnist_files(raw: Path):
    raw.mkdir(parents=True, exist_ok=True)
    for name in main.DATASETS["MNIST"]:
        (raw / name).write_bytes(b"not mnist")


def test_missing_and_offline_says_which_files_go_where(tmp_path, monkeypatch):
    def offline(data_dir, name):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(main, "download_dataset", offline)
    with pytest.raises(main.DataError) as err:
        main.ensure_dataset(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "download failed" in msg
    assert all(name in msg for name in main.DATASETS["MNIST"])
    assert "\n" not in msg


def test_download_goes_through_torchvision_and_is_then_checked(tmp_path, monkeypatch):
    """The online path: torchvision's MNIST(root, download=True) is asked for the files; what it writes
    is then checksummed like any local file (here it writes junk, so the MD5 check must catch it)."""
    import torchvision.datasets
    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((Path(root), download))
            fake_mnist_files(Path(root) / "MNIST" / "raw")
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    with pytest.raises(main.DataError, match="damaged or truncated"):
        main.ensure_dataset(tmp_path)
    assert calls == [(tmp_path, True)]


def test_no_download_attempt_when_files_are_present(tmp_path, monkeypatch, mnist_dir):
    shutil.copytree(mnist_dir / "MNIST", tmp_path / "MNIST")
    monkeypatch.setattr(main, "download_dataset", lambda d, name: pytest.fail("tried to download present files"))
    assert main.ensure_dataset(tmp_path) == list(main.DATASETS["MNIST"])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_is_named_by_its_checksum(tmp_path, mnist_dir, damage):
    shutil.copytree(mnist_dir / "MNIST", tmp_path / "MNIST")
    victim = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(victim.read_bytes())
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([(data[-1] + 1) % 256]))
    with pytest.raises(main.DataError, match="t10k-labels-idx1-ubyte is damaged or truncated"):
        main.ensure_dataset(tmp_path, download=False)


def test_real_mnist_loads_as_normalized_resident_tensors(mnist_dir):
    data = main.load_dataset(mnist_dir, download=False)
    pixels, labels = data["train"]
    assert pixels.shape == (60_000, 1, 28, 28) and pixels.dtype == torch.uint8 and labels.shape == (60_000,)
    assert data["test"][0].shape == (10_000, 1, 28, 28) and labels.dtype == torch.int64
    import torchvision.datasets  # the IDX files read as torchvision reads them
    for split, train in (("train", True), ("test", False)):
        theirs = torchvision.datasets.MNIST(mnist_dir, train=train, download=False)
        assert torch.equal(data[split][0][:, 0], theirs.data) and torch.equal(data[split][1], theirs.targets)
    splits = main.make_splits(data, torch.device("cpu"), val_size=5_000, seed=0)
    images = splits["train"][0]
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01  # normalized once
    assert [len(splits[s][1]) for s in ("train", "val", "test")] == [55_000, 5_000, 10_000]
    quick, other_seed = (main.make_splits(data, torch.device("cpu"), val_size=1_000, seed=seed, train_size=6_000,
                                          test_size=2_000) for seed in (0, 1))
    assert len(quick["train"][1]) == 6_000 and torch.equal(quick["test"][0], other_seed["test"][0])  # whatever the seed
    test_idx = main.split_indices(10_000, 2_000, 0)[1]  # a random draw from both halves of MNIST's test set
    assert torch.equal(quick["test"][1], splits["test"][1][test_idx]) and 900 < int((test_idx < 5_000).sum()) < 1100
    # the validation images are training images, never test images
    train_idx, val_idx = main.split_indices(60_000, 5_000, 0)
    expected = (pixels[val_idx].float() / 255 - main.MNIST_MEAN) / main.MNIST_STD
    torch.testing.assert_close(splits["val"][0], expected)


def test_shifted_tasks_are_exact_transforms_of_the_same_images():
    pixels = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    rotated = main.task_pixels(pixels, "rotated")
    assert torch.equal(rotated[0, 0, :, 0], pixels[0, 0, 0, :].flip(0))  # first row -> first column, bottom up
    assert torch.equal(main.task_pixels(rotated, "rotated").flip(2).flip(3), pixels)  # twice = 180 degrees
    assert main.task_pixels(pixels, "mnist") is pixels
    assert set(main.TASKS) == {"mnist", "rotated", "fashion"} and main.task_pixels(pixels, "fashion") is pixels
    labels = torch.arange(3)
    data = {"train": (pixels.repeat(4, 1, 1, 1), labels.repeat(4)), "test": (pixels, labels)}
    plain, turned = (main.make_splits(data, torch.device("cpu"), task, val_size=4, seed=1) for task in ("mnist", "rotated"))
    for split in ("train", "val", "test"):  # same images, same order, same labels; only the pixels move
        assert torch.equal(plain[split][1], turned[split][1])
        torch.testing.assert_close(torch.rot90(plain[split][0], 1, dims=(2, 3)), turned[split][0])
