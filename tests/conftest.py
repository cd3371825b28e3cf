"""Shared fixtures and helpers. Real MNIST comes from $MNIST_DIR (a folder holding MNIST/raw/, as .ci/run prepares
it). The method list, and the adapter classes the math tests run for, come from main.py's METHODS table."""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import main  # noqa: E402

QUICK_TRAIN_SIZE = 2000  # training images of the tests' --quick runs (see quick_runs_on_fewer_images)
ADAPTER_METHODS = [m for m in main.COMPARED if main.adapter_class(m)]  # every adapter method (a variant: its class's)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), lambda: torch.randn(5, 12)),
    # stride, padding and dilation all differ from the defaults, so lora_A must inherit them
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), lambda: torch.randn(2, 4, 9, 9)),
}


@pytest.fixture(scope="session", autouse=True)
def quick_runs_on_fewer_images():
    """Every --quick run the tests start in this process trains on 2,000 images, a third of a user's: the same
    code on less data, for a suite of minutes. (A fresh `python main.py` the tests start uses the full 6,000.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, "QUICK_TRAIN_SIZE", QUICK_TRAIN_SIZE)
        yield


def pytest_sessionstart(session):
    """The tests read MNIST from $MNIST_DIR (the README's test command sets it), fetched there as a run fetches it
    when missing: without it the suite stops at once in one sentence, rather than skipping most of itself."""
    folder = os.environ.get("MNIST_DIR")
    try:
        if not folder:
            raise main.DataError("it is not set")
        main.ensure_dataset(folder)
    except main.DataError as e:
        why = "is not set" if not folder else f"holds no MNIST/raw/ the tests can read ({main.one_line(e, 60)})"
        pytest.exit(f"MNIST_DIR {why}: point it at the folder holding MNIST/raw/ (the quick run's data/, or your "
                    f"--data-dir)", returncode=1)


@pytest.fixture(scope="session")
def mnist_dir():
    return Path(os.environ["MNIST_DIR"]).resolve()


@pytest.fixture(scope="session")
def fashion_dir(mnist_dir):
    """$MNIST_DIR with Fashion-MNIST in it too, fetched the way a user's run fetches it (torchvision's download,
    through main.ensure_dataset) when it is not there yet. Offline: skipped, saying how to get it; in CI, where
    .ci/run unpacks it, its absence is a failure."""
    try:
        main.ensure_dataset(mnist_dir, "FashionMNIST")
    except main.DataError as e:
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST must be in $MNIST_DIR/FashionMNIST/raw/ in CI (.ci/run unpacks it): {e}")
        pytest.skip(f"Fashion-MNIST is not in {mnist_dir / 'FashionMNIST' / 'raw'} and could not be downloaded: run "
                    f"`python main.py --quick --task fashion --data-dir {mnist_dir}` once with network access, or put "
                    f"its four IDX files there")
    return mnist_dir


def run(capsys, *argv):
    """main.main(argv) as the command line would run it: (exit code, stdout, stderr)."""
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def make(method, kind, rank=2, alpha=4.0, dropout=0.0, seed=0):
    """(base layer, `method`'s adapter layer around a copy of it, an input) for a Linear or a Conv2d."""
    torch.manual_seed(seed)
    layer_fn, x_fn = LAYERS[kind]
    base = layer_fn()
    wrapped = main.adapter_class(method)(copy.deepcopy(base), rank, alpha, dropout)
    return base, wrapped, x_fn()


def perturb(layer, seed=1):
    """Give every trainable tensor of an adapter layer a non-trivial value, as after some training (B starts at
    zero, DoRA's magnitude at the weight norms, a gate at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad and name != "lora_A":
                p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=g)) if name == "magnitude"
                        else torch.randn(p.shape, generator=g))


def adapt(model, method, rank=4, alpha=8, train_head=True):
    """`model` with `method`'s adapters at rank/alpha, as the experiment builds it (the class's own settings at
    their defaults)."""
    cls, settings = main.adapter_class(method), main.method_settings(method, main.parse_args([]))
    return main.add_adapters(model, cls, main.AdapterConfig(rank, alpha, bias=settings.bias), train_head,
                             **cls.options(settings))


@pytest.fixture
def no_plots(monkeypatch):
    """For tests of something else (resume, faults, the plan): no figures drawn. Seconds per run that those tests
    do not look at; the quick-run tests check them."""
    monkeypatch.setattr(main, "plot_results", lambda results, out_dir: [])
