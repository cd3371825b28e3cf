"""MNIST: train a small CNN, then fine-tune it with LoRA, two DoRAs (weight-decomposed; dynamic rank) and QLoRA,
beside full fine-tuning and the head alone, and compare them in accuracy and training memory.

    python main.py                       # the experiment with the SETTINGS below, into a new folder under runs/
    python main.py --quick               # a smoke run on a subset, in under a minute
    python main.py --task fashion --seeds 5 --lrs 1e-3,3e-3,1e-2   # a real domain shift, rates from validation
    python main.py --memory-batches 1,8,32,128,512   # training memory per method, width and batch: no training
    python main.py --help                # every flag: one per entry of SETTINGS, defaulting to it

Reading map. main() parses and checks the flags (parse_args, check_args), takes the out-dir's lock, then
run_experiment(): prepare() loads the data and any --resume records; comparison_run() runs each (method, seed,
rank) of plan_runs(), choosing the method's rate first (choose_rate: the --lrs grid on validation); run_method()
builds the model (finetuning_copy: an adapter class per METHODS row) and calls train(), the one training loop
(Adam, cosine rate, the best epoch kept; early stopping only with --patience; TrainingMemory counts and
measures its second step); finish_run() tests and saves it. After the runs: budget_check(), save_results()
(results.json, results.md), plot_results(). --recompute: KeepInput and each class's recomputed_grads.
A new method touches two places: a METHODS row and its adapter class (subclass AdapterLayer or LoRALayer).
Sections, top to bottom: settings, errors, model, adapter layers, data, training, measurement, saved models,
results over seeds, merging, results files, plots, the runs, the output folder, main(). Every name is defined
above its first use; `import main` has no side effects."""
import argparse
import contextlib
import copy
import functools
import hashlib
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NamedTuple

import filelock
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# ===== Settings: edit a default here, or override it for one run with its flag (python main.py --help) =====
class Method(NamedTuple):
    name: str          # in tables, plots and messages
    color: str         # its lines, points and bars in every plot
    marker: str        # its points where several methods share an axis (the rank sweep)
    lr: float          # Adam's rate at the start of its runs, cosine-decayed to 0 (without --lr or --lrs)
    trains: str        # "all" its parameters, only the classifier "head", or the "adapters" (and the head)
    layer: str = ""    # with "adapters": the adapter class wrapping every Linear/Conv2d (defined below)
    settings: dict = {}  # a variant: the SETTINGS its runs use instead of the run's (off the default --methods)


METHODS = {  # every fine-tuning method, one row each: everything else about a method is derived from here
    "full": Method(name="Full FT", color="tab:purple", marker="*", lr=1e-3, trains="all"),  # every PEFT paper's
    "head": Method(name="Head only", color="tab:brown", marker="v", lr=1e-3, trains="head"),  # what adapters must beat
    "lora": Method(name="LoRA", color="tab:blue", marker="o", lr=1e-3, trains="adapters", layer="LoRALayer"),
    "dora": Method(name="DoRA (weight-decomposed)", color="tab:orange", marker="s", lr=1e-3, trains="adapters",
                   layer="DoRALayer"),
    "dyndora": Method(name="DoRA (dynamic rank)", color="tab:red", marker="d", lr=1e-3, trains="adapters",
                      layer="DynamicRankLayer"),
    "qlora": Method(name="QLoRA", color="tab:green", marker="^", lr=1e-3, trains="adapters", layer="QLoRALayer"),
    "lora_bias": Method(name="LoRA + biases", color="tab:cyan", marker="P", lr=1e-3, trains="adapters",
                        layer="LoRALayer", settings={"bias": "lora_only"}),  # what full fine-tuning trains too
    "dyndora_params": Method(name="DoRA (dynamic rank, LoRA's storage)", color="tab:pink", marker="X", lr=1e-3,
                             trains="adapters", layer="DynamicRankLayer", settings={"dyn_budget": "params"}),
}  # the rates: one common default, not a grid's choice; each study chose its own with --lrs (README)
COMPARED = [m for m, spec in METHODS.items() if not spec.settings]  # the default --methods: no variant
BASE = Method(name="Base", color="tab:gray", marker="o", lr=2e-3, trains="all")  # every method's start: the MNIST CNN
TASKS = {  # what the methods fine-tune on, the same split sizes; the base always trains on MNIST
    "mnist": "MNIST itself, the data the base was trained on",
    "rotated": "MNIST digits rotated by 90 degrees (counter-clockwise)",
    "fashion": "Fashion-MNIST: 28x28 grey images of 10 kinds of clothing, a real domain shift",
}


def within(kind, low, high=math.inf, most=0):
    """An argparse type: a `kind` number in [low, high]; with `most`, a sorted comma list of at most `most`."""
    def parse(text):
        try:
            values = sorted({kind(v) for v in text.split(",") if v.strip()} if most else {kind(text)})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'whole numbers' if kind is int else 'numbers'} expected"
                                             f"{', separated by commas' if most else ''} (got {text!r})") from None
        if most and len(values) > most:
            raise argparse.ArgumentTypeError(f"holds {len(values)} values: at most {most}")
        if bad := [v for v in values if not low <= v <= high]:
            bounds = f"at least {low}" if high == math.inf else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {bad[0]})")
        return values if most else values[0]
    return parse


SETTINGS = {  # name: (default, type, meaning); the flag is --name with - for _ (--batch-size), on/off for a bool
    "methods": (",".join(["base", *COMPARED]), str, "the runs, in order, base first (variants: "
                                                    + ", ".join(m for m in METHODS if m not in COMPARED) + ")"),
    "task": ("mnist", str, "what the methods fine-tune on: " + ", ".join(TASKS)),
    "seeds": (1, within(int, 1, 1000), "every method runs with seeds seed .. seed+seeds-1"),
    "epochs": (8, within(int, 1, 10_000), "epoch budget of the base model"),
    "finetune_epochs": (10, within(int, 1, 10_000), "epoch budget of every fine-tuning method"),
    "batch_size": (128, within(int, 1), "training batch size, the same for every method"),
    "lr": (None, float, "one Adam rate for every method and the base instead of their rows' rates"),
    "lrs": ("", within(float, 0, most=20),
            "rate grid, e.g. 1e-3,3e-3,1e-2: each method takes its best on the first seed's validation"),
    "patience": (None, within(int, 0), "early stopping after this many epochs without a better one (none: off)"),
    "rank": (8, int, "r, the rank of the update B A"),
    "alpha": (16, float, "the update is scaled by alpha / r (or alpha / sqrt(r): --scaling)"),
    "scaling": ("lora", str, "lora (alpha / r) or rslora (alpha / sqrt(r), PEFT's use_rslora)"),
    "ranks": ("", within(int, 1, most=16), "rank sweep, e.g. 2,16: the adapter methods again at each rank"),
    "grid_per_rank": (False, bool, "rank sweep: each rank's rate chosen on its own --lrs grid (else r's rate)"),
    "budgets": ("", within(int, 1, 10_000, most=10),
                "budget check, e.g. 20,40: the first seed's runs again at these budgets, on validation"),
    "dropout": (0.0, float, "dropout on the adapter's input (0 lets DoRA reuse the base's output)"),
    "dyn_components": (1.5, within(float, 1, 10), "dynamic-rank DoRA: ceil(this x r) components per layer at start"),
    "dyn_prune_from": (0.15, within(float, 0, 1), "dynamic-rank DoRA: pruning starts at this fraction of the steps"),
    "dyn_prune_until": (0.5, within(float, 0, 1), "dynamic-rank DoRA: and reaches the budget at this fraction"),
    "dyn_prune_steps": (20, within(int, 1, 10_000), "dynamic-rank DoRA: pruning steps, spread over that window"),
    "dyn_beta": (0.9, within(float, 0, 0.999), "dynamic-rank DoRA: moving-average factor of the importance"),
    "dyn_dem": (0.1, within(float, 0, 1e6), "dynamic-rank DoRA: weight of the variance regulariser (DEM)"),
    "dyn_budget": ("components", str, "dynamic-rank DoRA: the budget in components (r a layer) or stored params"),
    "recompute": (False, bool, "adapters keep only their input for backward and recompute the rest (less memory)"),
    "train_head": (True, bool, "the classifier head fully trainable instead of adapted"),
    "bias": ("none", str, "the adapters' trainable biases, as PEFT's LoraConfig(bias=...): none, lora_only, all"),
    "width": (1, within(int, 1, 16), "the CNN's width: its channels (16, 32) and fc1's units (256) times this"),
    "memory_batches": ("", within(int, 1, 4096, most=20), "memory sweep instead of training, e.g. 1,8,128,512"),
    "memory_widths": ("1,2,4,8", within(int, 1, 16, most=8), "the CNN widths of the memory sweep"),
    "device": ("auto", str, "auto (cuda when available), cpu or cuda"),
    "data_dir": ("data", str, "holds MNIST/raw/ and FashionMNIST/raw/; torchvision downloads there if missing"),
    "out_dir": ("", str, "the run's folder, new or empty (a run's, with --resume); default: new under runs/"),
    "seed": (0, within(int, 0, 2**32 - 1000), "the first seed; it also fixes the validation split"),
}
QUANT_BLOCKSIZE = 64               # QLoRA: NF4 block size (64 in Dettmers et al. 2023)
VAL_SIZE = 5000                    # images held out of the 60,000 training images: the kept epoch, the rate
# --quick: a smoke run on subsets; its test images a fixed random 2,000 of the 10,000
QUICK_TRAIN_SIZE, QUICK_VAL_SIZE, QUICK_TEST_SIZE, QUICK_MAX_EPOCHS = 6000, 1000, 2000, 2
TASK_DATASET = {"fashion": "FashionMNIST"}  # where a task's images come from; the others are made from MNIST
MAX_RATE = 10.0   # Adam moves each weight by about the rate per step: past 10, no fine-tuning, only noise
MAX_ALPHA = 1e4   # alpha / r: the update's scale; the literature's 8-64, with room for a sweep (1e29 zeroed B)


def row(method):
    return BASE if method == "base" else METHODS[method]


def adapter_class(method):
    """The adapter class of an adapter method (named in its row), None for full fine-tuning, head only, the base."""
    return globals()[METHODS[method].layer] if method in METHODS and METHODS[method].trains == "adapters" else None


def display(method):
    """A method's name in tables and plots ("Base" for the base stage); a name no row knows, as it is."""
    return row(method).name if isinstance(method, str) and (method == "base" or method in METHODS) else str(method)


def variant_of(method):
    """The row a variant changes the settings of (lora for lora_bias), or None for a method of its own."""
    spec = row(method)
    return next(m for m in COMPARED if METHODS[m].layer == spec.layer) if spec.settings else None


ROW_SETTINGS = ("alpha", "dropout", "scaling", "bias", "train_head", *(k for k in SETTINGS if k.startswith("dyn_")))


def method_settings(method, args):  # the run's settings, with what the method's row overrides
    return argparse.Namespace(**vars(args) | row(method).settings)


def default_rates():
    return {m: row(m).lr for m in ["base", *METHODS]}


def changed_settings(config):
    """The settings a run took other than SETTINGS' defaults, as "rank 4, lrs [0.001, 0.01]"."""
    return ", ".join(f"{name.replace('_', ' ')} {config[name]}" for name, (default, kind, _) in SETTINGS.items()
                     if name in config and name != "quick"  # a default parsed as its flag would parse it
                     and config[name] != (default if default is None or kind is bool else kind(str(default))))


def epoch_budget(config, method=None, epochs=None):
    """The epochs a run of `method` trains: `epochs` in the budget check, else the settings' (capped if quick)."""
    budget = epochs or (config["epochs"] if method == "base" else config["finetune_epochs"])
    return min(budget, QUICK_MAX_EPOCHS) if config["quick"] and not epochs else budget


# ===== Errors: each one sentence for the user; main() maps them to exit codes =====
class ConfigError(ValueError):
    """Bad input (a setting, the out-dir, an earlier results file), found before any training: exit code 2."""


class DataError(ConfigError):  # MNIST or Fashion-MNIST missing or damaged
    pass


class WriteError(RuntimeError):  # an output that cannot be written: exit code 1
    pass


class ModelFileError(RuntimeError):  # a saved model that cannot be loaded as this CNN's
    pass


class BitsAndBytesUnavailable(RuntimeError):  # QLoRA is skipped, the other methods run
    pass


class Diverged(RuntimeError):
    """A run that failed to learn; too_slow when it ended at chance with a loss that never rose."""

    def __init__(self, message, too_slow=False):
        super().__init__(message)
        self.too_slow = too_slow


def one_line(error, limit=150):
    """An exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text[:limit] + ("…" if len(text) > limit else "")


# ===== Model =====
class CNN(nn.Module):
    """Two 5x5 conv layers (16, 32 channels) and two linear: 147k parameters; `width` multiplies the channels."""

    head = "fc2"  # the classifier layer, left fully trainable with --train-head

    def __init__(self, width=1):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16 * width, 5)              # 28x28 -> 24x24, pooled to 12x12
        self.conv2 = nn.Conv2d(16 * width, 32 * width, 5)     # 12x12 -> 8x8, pooled to 4x4
        self.fc1 = nn.Linear(32 * width * 4 * 4, 256 * width)
        self.fc2 = nn.Linear(256 * width, 10)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


# ===== Adapter layers: one base, four methods; Linear and Conv2d differ only in `layer_op` =====
def trainable_parameters(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def update_scale(alpha, rank, rslora=False):
    """The factor on B A: alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (a rank-stable step size)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class AdapterConfig(NamedTuple):
    """How a model's adapter layers are built, in the names of PEFT's LoraConfig (saving writes them there)."""
    r: int                      # the rank of every adapted layer ...
    lora_alpha: float           # ... and its alpha: the update is scaled by alpha / r (or / sqrt(r))
    lora_dropout: float = 0.0   # dropout on the adapter's input
    use_rslora: bool = False    # the scale alpha / sqrt(r) instead (Kalajdzievski 2023)
    rank_pattern: dict = {}     # {layer name: rank} of the layers that differ (a saved dynamic-rank adapter)
    alpha_pattern: dict = {}    # {layer name: alpha}, likewise
    bias: str = "none"          # the biases that train: "none", the adapted layers' ("lora_only"), or "all"

    def for_layer(self, name):
        return self.rank_pattern.get(name, self.r), self.alpha_pattern.get(name, self.lora_alpha)


class KeepInput(torch.autograd.Function):
    """--recompute: an adapter layer's output keeping only its input x for backward; backward recomputes the rest."""

    @staticmethod
    def forward(ctx, x, layer, *params):
        ctx.layer, ctx.params = layer, params
        ctx.save_for_backward(x)
        return layer.output(x)  # autograd is off here: nothing else is kept

    @staticmethod
    def backward(ctx, grad_out):
        x, = ctx.saved_tensors
        grad_x, grads = ctx.layer.recomputed_grads(x.detach().requires_grad_(ctx.needs_input_grad[0]), grad_out,
                                                   ctx.params)
        return grad_x, None, *grads


class AdapterLayer(nn.Module):
    """What every adapter shares: a frozen Linear/Conv2d weight W and bias b, and a trainable update dW = (alpha/r)
    B A laid out as PEFT stores it (Conv2d: A a conv with the base's kernel, B a 1x1 conv); A Kaiming-uniform, B zero,
    so a fresh layer computes what the base did. A method is a subclass: output and merged_weight are its math (in
    eval mode output(x) = layer_op(x, merged_weight(), b)); below them, what the experiment asks of every method."""
    peft_fields = {}     # LoraConfig fields that tell PEFT which variant this is (DoRA: use_dora)
    loads_as = None      # the class a saved folder is rebuilt as, when it is not this one
    peft_loads_as = None  # the method PEFT's loading amounts to, when it computes something else (QLoRA: LoRA)
    uses_bitsandbytes = False  # imported (seconds) and its version reported only for a run with such a method
    recompute = False  # --recompute: keep only the layer's input for backward (KeepInput)

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError("only ungrouped, zero-padded Conv2d layers can be adapted")
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        weight = base.weight.detach()
        self.weight_shape = weight.shape
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = update_scale(alpha, rank, rslora)
        self.lora_A = nn.Parameter(torch.empty(rank, *weight.shape[1:], device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, *((1, 1) if self.is_conv else ()),
                                               device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear/nn.Conv2d init their weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.store_base_weight(weight)

    def forward(self, x):  # the method's output(x); with --recompute, keeping only x for backward
        if self.recompute and torch.is_grad_enabled():
            return KeepInput.apply(x, self, *trainable_parameters(self).values())
        return self.output(x)

    def store_base_weight(self, weight):  # QLoRA stores it in 4 bits instead
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)

    def base_weight(self):
        return self.weight

    def frozen_weight_bytes(self):
        return self.weight.nbytes

    def layer_op(self, x, weight, bias=None):  # the base layer's own operation, with any weight of its shape
        return F.conv2d(x, weight, bias, **self.conv_args) if self.is_conv else F.linear(x, weight, bias)

    def per_output(self, v):  # a per-output-unit vector [out], shaped to broadcast over this layer's output
        return v.view(-1, 1, 1) if self.is_conv else v

    def per_unit_sum(self, t):  # an output-shaped tensor summed over all but its units: dL/db from dL/dy
        return t.sum(dim=(0, 2, 3) if self.is_conv else tuple(range(t.dim() - 1)))

    def input_grad(self, grad_out, input_shape, unit_scale=None):  # dL/dx of y = s layer_op(x, W), W frozen
        weight = self.scaled_units(self.base_weight(), unit_scale)  # (s W)^T dL/dy: s folded into W, not dL/dy
        return (torch.nn.grad.conv2d_input(input_shape, weight, grad_out, **self.conv_args) if self.is_conv
                else grad_out @ weight)

    def update_grads(self, x, grad_out, params, known, unit_scale=None):
        """--recompute's backward of y = s (W x + dW x) + ... (s = 1 but for DoRA): s dW x again, W x not (frozen)."""
        update_params = [p for p in params if id(p) not in known]
        with torch.enable_grad():  # (a subclass's own lora(x) need not take a scale: only DoRA passes one)
            update = self.lora(x) if unit_scale is None else self.lora(x, unit_scale)
        grads = torch.autograd.grad(update, [x] * x.requires_grad + update_params, grad_out, allow_unused=True)
        by_id = dict(zip(map(id, update_params), grads[x.requires_grad:])) | known
        grad_x = grads[0] + self.input_grad(grad_out, x.shape, unit_scale) if x.requires_grad else None
        return grad_x, [by_id[id(p)] for p in params]

    def scaled_units(self, weight, scale):  # a weight [out, ...] times a per-output-unit scale, if any
        return weight if scale is None else weight * scale.view(-1, *[1] * (weight.dim() - 1))

    def recomputed_grads(self, x, grad_out, params):  # --recompute's backward for any method: output(x) again
        with torch.enable_grad():
            out = self.output(x)
        grads = torch.autograd.grad(out, [x] * x.requires_grad + list(params), grad_out, allow_unused=True)
        return (grads[0] if x.requires_grad else None), list(grads[x.requires_grad:])

    def bias_grad(self, grad_out):  # {id: dL/db} of a trained bias, else {}
        trained = self.bias is not None and self.bias.requires_grad
        return {id(self.bias): self.per_unit_sum(grad_out)} if trained else {}

    def scaled_B(self):  # the update's scale folded into the tiny B, not applied to the large output
        return self.lora_B * self.scaling

    def lora(self, x, unit_scale=None):  # dW x = (alpha/r) B (A x), without forming the dense dW (s dW x: s in B)
        h, B = self.layer_op(x, self.lora_A), self.scaled_units(self.scaled_B(), unit_scale)
        return F.conv2d(h, B) if self.is_conv else F.linear(h, B)

    def delta_weight(self):  # dW = (alpha/r) B A, dense, shaped like W
        return (self.scaled_B().flatten(1) @ self.lora_A.flatten(1)).view(self.weight_shape)

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear/nn.Conv2d computing what this layer computes in eval mode."""
        w, has_bias = self.merged_weight(), self.bias is not None
        layer = (nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=has_bias, **self.conv_args) if self.is_conv
                 else nn.Linear(w.shape[1], w.shape[0], bias=has_bias)).to(w.device).requires_grad_(False)
        layer.weight.copy_(w)
        if has_bias:
            layer.bias.copy_(self.bias)
        return layer

    # ---- what the rest of the experiment asks of a method, overridden where it differs ------------------
    def peft_tensors(self):  # {PEFT's name in this layer: the tensor as PEFT stores it}; loading copies into these
        bias = {"base_layer.bias": self.bias} if self.bias is not None and self.bias.requires_grad else {}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B} | bias

    def stored_weight_count(self):  # weights stored outside the parameters (QLoRA's 4-bit W), in the model's total
        return 0

    def extra_stored_bytes(self):  # bytes stored beside the parameters and buffers (QLoRA's quantization constants)
        return 0

    # class methods, given all of a model's layers of this class at once ({full name: layer})
    @classmethod
    def peft_config(cls, layers):  # the LoraConfig fields this method sets
        return dict(cls.peft_fields)

    @classmethod
    def record(cls, layers):  # what results.json and the saved training_info.json record of this method's run
        return {}

    @classmethod
    def options(cls, args):  # its constructor's own keyword arguments, from the settings (and checked there)
        return {}

    @classmethod
    def regularizer(cls, layers, step, total_steps):  # train(): a term added to the loss at this step, or None
        return None

    @classmethod
    def on_step(cls, layers, step, total_steps):  # train(): after each optimizer step, 1 .. total_steps
        pass

    @classmethod
    def settled_at(cls, layers, total_steps):  # train(): the step from which the structure is final; an epoch
        return 0                                # ending before it is never kept (pruning would remove parts of it)


class LoRALayer(AdapterLayer):
    """LoRA (Hu et al. 2021): W frozen, only B and A learn."""

    def output(self, x):
        # y = W x + b + dW dropout(x), dW = (alpha/r) B A: layer_op(x, merged_weight(), bias) in eval mode.
        # add_ in place saves a pass over the output; autograd allows it, as nothing kept W x for backward
        return self.layer_op(x, self.base_weight(), self.bias).add_(self.lora(self.dropout(x)))

    def recomputed_grads(self, x, grad_out, params):  # y = W x + b + dW x (a subclass computing else overrides)
        return self.update_grads(x, grad_out, params, self.bias_grad(grad_out))

    @torch.no_grad()
    def merged_weight(self):
        return self.base_weight() + self.delta_weight()  # W + dW


class DoRALayer(AdapterLayer):
    """DoRA (Liu et al. 2024): W' = m (W + dW) / ||W + dW||, the norm per output unit, detached (section 4.3)."""

    peft_fields = {"use_dora": True}

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__(base, rank, alpha, dropout, rslora)
        self.magnitude = nn.Parameter(self.weight_norm(self.base_weight()).clone())

    def peft_tensors(self):  # PEFT keeps a conv's magnitude as [1, out, 1, 1], a Linear's as [out]
        magnitude = self.magnitude.view(1, -1, 1, 1) if self.is_conv else self.magnitude
        return super().peft_tensors() | {"lora_magnitude_vector": magnitude}

    @staticmethod
    def weight_norm(weight):
        return weight.flatten(1).norm(dim=1)

    def output(self, x):
        # y = W' x + b, W' = m (W + dW) / ||W + dW||: layer_op(x, merged_weight(), bias) in eval mode.
        # Never forms W': W x and dW x are computed apart and scaled per output unit by s = m / ||W + dW||.
        weight = self.base_weight()
        with torch.no_grad():  # detached: no graph built for it, none kept and dropped
            norm = self.weight_norm(weight + self.delta_weight())
        scale = self.per_output(self.magnitude / norm)  # s
        base_out = self.layer_op(x, weight)  # W x, without bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # y = s (W x + dW x) + b: W x computed once, two passes over the output
            direction_out = base_out.add_(self.lora(x))
            if self.bias is None:
                return direction_out * scale
            return torch.addcmul(self.per_output(self.bias), direction_out, scale)  # b + s * direction_out, fused
        # with dropout, as PEFT: y = W x + (s - 1) W x' + s dW x' + b, x' = dropout(x): the adapter sees x' only
        x_drop = self.dropout(x)
        out = base_out + (scale - 1) * self.layer_op(x_drop, weight) + scale * self.lora(x_drop)
        return out if self.bias is None else out + self.per_output(self.bias)

    @torch.no_grad()  # s is detached, as in output(), whether or not the caller records a graph
    def recomputed_grads(self, x, grad_out, params):
        """y = s (W x + dW x) + b, s = m / ||W + dW|| detached: dL/dm = sum of dL/dy (W x + dW x) per unit / norm."""
        weight = self.base_weight()
        norm = self.weight_norm(weight + self.delta_weight())
        grad_m = self.per_unit_sum(self.layer_op(x, weight).add_(self.lora(x)).mul_(grad_out)) / norm
        known = {id(self.magnitude): grad_m} | self.bias_grad(grad_out)
        return self.update_grads(x, grad_out, params, known, unit_scale=self.magnitude / norm)

    @torch.no_grad()
    def merged_weight(self):
        direction = self.base_weight() + self.delta_weight()  # W + dW
        return (self.magnitude / self.weight_norm(direction)).view(-1, *[1] * (direction.dim() - 1)) * direction


@functools.cache
def bitsandbytes():
    """bitsandbytes.functional, or BitsAndBytesUnavailable: QLoRA is skipped, the other methods run."""
    try:
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):  # it warns loudly on import
            import bitsandbytes.functional as bnbf
    except Exception as e:  # ImportError, or a backend that fails to load
        raise BitsAndBytesUnavailable(f"bitsandbytes cannot be imported ({type(e).__name__}: {e})") from None
    return bnbf


class FrozenQuantized(torch.autograd.Function):
    """y = layer_op(x, W) + b for QLoRA's 4-bit W: backward dequantizes W again, no fp32 copy kept."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.input_shape = layer, x.shape
        return layer.layer_op(x, layer.base_weight(), bias)  # forward runs without autograd: nothing kept

    @staticmethod
    def backward(ctx, grad_out):  # not for the first layer's input (the images): no dequantization at all
        layer, (needs_x, needs_bias, _) = ctx.layer, ctx.needs_input_grad
        return (layer.input_grad(grad_out, ctx.input_shape) if needs_x else None,
                layer.per_unit_sum(grad_out) if needs_bias else None, None)


class QLoRALayer(LoRALayer):
    """QLoRA (Dettmers et al. 2023): LoRA on W stored in 4-bit NF4 with double quantization (bitsandbytes)."""

    peft_loads_as = "lora"  # PEFT has no 4-bit conv: it puts this adapter on the fp32 base
    uses_bitsandbytes = True

    def output(self, x):
        # LoRA's y = W x + b + dW dropout(x), W x + b without keeping the dequantized W for backward
        return FrozenQuantized.apply(x, self.bias, self).add_(self.lora(self.dropout(x)))

    def store_base_weight(self, weight):
        # Quantized as one flat vector: blocks of 64 consecutive weights either way, but bitsandbytes' CPU
        # kernel needs an even last dimension; a conv's [.., 5, 5] would fall back to a torch.compile'd
        # generic path that recompiles on every switch between training and inference (seconds each).
        quantize = bitsandbytes().quantize_4bit
        try:
            packed, self.quant_state = quantize(weight.reshape(-1), blocksize=QUANT_BLOCKSIZE,
                                                compress_statistics=True, quant_type="nf4")
        except Exception as e:  # imports but does not work here: no kernel for this GPU, a broken build
            raise BitsAndBytesUnavailable(f"bitsandbytes' quantize_4bit failed ({type(e).__name__}: "
                                          f"{one_line(e)})") from None
        self.register_buffer("weight_4bit", packed)

    def base_weight(self):
        weight = bitsandbytes().dequantize_4bit(self.weight_4bit, self.quant_state).view(self.weight_shape)
        if not self.is_conv:
            return weight
        # channels-last strides, as model.to(memory_format=channels_last) gives the other weights: with one
        # input channel the layout is ambiguous, and plain strides made the conv emit NCHW (pooling 4x slower)
        return torch.empty(self.weight_shape, device=weight.device, memory_format=torch.channels_last).copy_(weight)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.quant_state.to(self.weight_4bit.device)  # the absmax/code tensors follow the packed weight
        return self

    def quant_state_bytes(self):  # absmax and code tables of both quantization levels: stored with W, counted so
        qs = self.quant_state
        tensors = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
        return sum(t.nbytes for t in tensors)

    def frozen_weight_bytes(self):
        return self.weight_4bit.nbytes + self.quant_state_bytes()

    def stored_weight_count(self):
        return math.prod(self.weight_shape)

    def extra_stored_bytes(self):
        return self.quant_state_bytes()

    @classmethod
    def record(cls, layers):
        return {"base_quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": QUANT_BLOCKSIZE,
                                      "note": "trained against the NF4-quantized base; PEFT puts it on the fp32 base"}}


class DynamicRank(NamedTuple):
    """The dynamic-rank DoRA's schedule; every number a setting (SETTINGS' dyn_*), defaults after the authors."""
    components: float = 1.5   # r' = ceil(components x r) rank-1 components per layer at the start
    prune_from: float = 0.15  # the pruning window, in fractions of the training steps
    prune_until: float = 0.5
    prune_steps: int = 20     # pruning steps in that window (the authors prune every 100 steps of longer runs)
    beta: float = 0.9         # moving average of the importance
    dem: float = 0.1          # weight of the Dimensional Equilibrium Modulator in the loss
    budget: str = "components"  # what is brought down to LoRA's at r: the components, or the "params" they store

    def window(self, total_steps):
        """(first, last) step of pruning: at least one step, so the budget is always reached."""
        start = min(round(self.prune_from * total_steps), total_steps - 1)
        return start, min(total_steps, max(start + 1, round(self.prune_until * total_steps)))

    def pruning_steps(self, total_steps):
        start, end = self.window(total_steps)
        return {start + math.ceil((end - start) * i / self.prune_steps) for i in range(1, self.prune_steps + 1)}

    def pruned_share(self, step, total_steps):  # the cubic schedule: the share of the pruning done by `step`
        start, end = self.window(total_steps)
        return min(1.0, max(0.0, (step - start) / (end - start))) ** 3


class DynamicRankLayer(LoRALayer):
    """DoRA (Mao et al. 2024, Dynamic Rank Distribution): dW = (alpha/r') B diag(c) A, r' = ceil(1.5 r) rank-1
    components, gates c at zero. Importance |c_i| ||B_i|| ||A_i|| / ||dW||_F, smoothed, is pruned against one threshold
    over all layers (cubically, in the window) until r a layer remain on average (or LoRA's storage: --dyn-budget
    params), the loss carrying the Dimensional Equilibrium Modulator until then. Saved: a LoRA with a rank per layer."""
    loads_as = LoRALayer

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False, schedule=DynamicRank()):
        components = math.ceil(schedule.components * rank)
        super().__init__(base, components, alpha, dropout, rslora)  # self.rank = r' components: scale alpha / r'
        for tensor in (self.lora_A, self.lora_B):  # both Kaiming-uniform, as the authors: the zero gates keep dW = 0
            nn.init.kaiming_uniform_(tensor)
        self.target_rank, self.schedule = rank, schedule
        self.gate = nn.Parameter(torch.zeros(components, device=self.lora_A.device))
        self.register_buffer("alive", torch.ones(components, dtype=torch.bool, device=self.lora_A.device))
        self.register_buffer("importance", torch.zeros(components, device=self.lora_A.device))

    def scaled_B(self):  # (alpha/r') B diag(c): the gates scale B's columns, a tiny tensor, not the activations
        gates = self.scaling * self.gate
        return self.lora_B * (gates.view(1, -1, 1, 1) if self.is_conv else gates)

    @torch.no_grad()
    def update_importance(self, beta):  # moving average of each component's share of the update (scale cancels)
        update = (self.lora_B.flatten(1) * self.gate) @ self.lora_A.flatten(1)  # B diag(c) A
        share = self.gate.abs() * self.lora_B.flatten(1).norm(dim=0) * self.lora_A.flatten(1).norm(dim=1)
        self.importance.mul_(beta).add_((1 - beta) * share / (update.norm() + 1e-8))

    @torch.no_grad()
    def hold_pruned(self):
        """Zero what pruned components hold (Adam's momentum would move them), by multiplying by the mask."""
        alive = self.alive.to(self.gate.dtype)
        self.gate.mul_(alive)
        self.lora_A.mul_(alive.view(-1, *[1] * (self.lora_A.dim() - 1)))
        self.lora_B.mul_(alive.view(1, -1, *[1] * (self.lora_B.dim() - 2)))

    @classmethod
    @torch.no_grad()
    def prune(cls, layers, step, total_steps):
        """Prune the least important components of all layers (one threshold) to the schedule's share of the budget."""
        schedule = next(iter(layers.values())).schedule
        cost = {name: 1 if schedule.budget == "components" else layer.lora_A[0].numel() + layer.lora_B.shape[0]
                for name, layer in layers.items()}
        target = math.floor(sum((l.rank - l.target_rank) * cost[name] for name, l in layers.items())
                            * schedule.pruned_share(step, total_steps))
        candidates = []
        for name, layer in layers.items():
            alive = layer.alive.nonzero().flatten().tolist()
            kept = max(alive, key=lambda i: layer.importance[i].item())
            candidates += [(layer.importance[i].item(), name, i) for i in alive if i != kept]
        done = sum(int((~layer.alive).sum()) * cost[name] for name, layer in layers.items())
        for _, name, i in sorted(candidates):
            if done >= target:
                break
            layers[name].alive[i], done = False, done + cost[name]

    # ---- train()'s hooks ------------------------------------------------------------------------------
    @classmethod
    def on_step(cls, layers, step, total_steps):
        schedule = next(iter(layers.values())).schedule
        if step <= schedule.window(total_steps)[1]:
            for layer in layers.values():
                layer.update_importance(schedule.beta)
        if step in schedule.pruning_steps(total_steps):
            cls.prune(layers, step, total_steps)
        for layer in layers.values():
            layer.hold_pruned()

    @classmethod
    def regularizer(cls, layers, step, total_steps):
        """The Dimensional Equilibrium Modulator: dem x the mean variance of the components' A rows, B columns."""
        schedule = next(iter(layers.values())).schedule
        if step > schedule.window(total_steps)[1] or schedule.dem == 0:
            return None
        variances = [v for layer in layers.values() for A, B in [(layer.lora_A, layer.lora_B)]  # no flattened copy
                     for v in (A.var(dim=tuple(range(1, A.dim()))), B.var(dim=(0, *range(2, B.dim()))))]
        return schedule.dem * torch.cat(variances).mean()

    @classmethod
    def settled_at(cls, layers, total_steps):
        return next(iter(layers.values())).schedule.window(total_steps)[1]

    # ---- saving, loading, measuring -----------------------------------------------------------------------
    @classmethod
    def options(cls, args):  # each number bounded by its SETTINGS type; the window's order checked here
        if not args.dyn_prune_from < args.dyn_prune_until:
            raise ConfigError(f"--dyn-prune-from ({args.dyn_prune_from}) must come before --dyn-prune-until "
                              f"({args.dyn_prune_until}): pruning runs between the two")
        return {"schedule": DynamicRank(*(getattr(args, f"dyn_{k}") for k in DynamicRank._fields))}

    def peft_tensors(self):  # the surviving components only, their gates folded into B: a LoRA of their rank
        alive = self.alive
        gated_B = self.lora_B[:, alive] * (self.gate[alive].view(1, -1, 1, 1) if self.is_conv else self.gate[alive])
        return super().peft_tensors() | {"lora_A.weight": self.lora_A[alive], "lora_B.weight": gated_B}

    @classmethod
    def peft_config(cls, layers):
        """Each layer's rank, and the alpha that keeps PEFT's scale alpha_l / r_l at our alpha / r'."""
        ranks = {name: int(layer.alive.sum()) for name, layer in layers.items()}
        return {"rank_pattern": ranks, "alpha_pattern": {  # PEFT scales by alpha_l / r_l, or / sqrt(r_l) with rsLoRA
            name: layer.scaling * (math.sqrt(ranks[name]) if layer.rslora else ranks[name])
            for name, layer in layers.items()}}

    @classmethod
    def record(cls, layers):
        """Where the rank went: each layer's final rank."""
        first = next(iter(layers.values()))
        return {"rank_allocation": {
            "components": first.rank, "target_rank": first.target_rank, "schedule": first.schedule._asdict(),
            "ranks": {name: int(layer.alive.sum()) for name, layer in layers.items()}}}


def adaptable_layers(model, train_head=True):
    """(parent module, attribute name, full name, layer) for every Linear/Conv2d the adapters replace."""
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, (nn.Linear, nn.Conv2d)) and not (train_head and full == getattr(model, "head", None)):
                found.append((parent, name, full, child))
    return found


def max_rank(model, train_head=True):
    """The largest rank every adapted layer admits: min(in, out), `in` being in_channels*kh*kw for a conv."""
    return min(min(layer.weight.shape[0], layer.weight[0].numel())
               for *_, layer in adaptable_layers(model, train_head))


def add_adapters(model, cls, config, train_head=True, **options):
    """Every Linear/Conv2d replaced in place by a `cls` adapter layer, the rest frozen (the head trains)."""
    model.requires_grad_(False)
    for parent, name, full, layer in adaptable_layers(model, train_head):
        rank, alpha = config.for_layer(full)
        setattr(parent, name, cls(layer, rank, alpha, config.lora_dropout, config.use_rslora, **options))
    if train_head and getattr(model, "head", None):
        model.get_submodule(model.head).requires_grad_(True)
    for name, module in model.named_modules():  # PEFT's LoraConfig(bias=...): "all" trains every bias there is
        if getattr(module, "bias", None) is not None and (config.bias == "all" or config.bias == "lora_only"
                                                          and isinstance(module, AdapterLayer)):
            module.bias.requires_grad_(True)
    return model


def adapter_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def finetuning_copy(base, method, rank, settings):
    """A copy of `base` training what `method`'s row says: every parameter, the head, or its adapters."""
    model, spec = copy.deepcopy(base), row(method)
    if spec.trains == "all":
        return model.requires_grad_(True)
    if spec.trains == "head":
        model.requires_grad_(False).get_submodule(CNN.head).requires_grad_(True)
        return model
    cls, settings = adapter_class(method), method_settings(method, settings)
    config = AdapterConfig(rank, settings.alpha, settings.dropout, use_rslora=settings.scaling == "rslora",
                           bias=settings.bias)
    add_adapters(model, cls, config, settings.train_head, **cls.options(settings))
    for layer in adapter_layers(model).values():
        layer.recompute = settings.recompute
    return model


def peft_tensors(model):
    """{PEFT's key: the tensor as PEFT stores it} of everything the model trained (the head under its name)."""
    adapters = adapter_layers(model)
    tensors = {f"base_model.model.{name}.{leaf}": t for name, layer in adapters.items()
               for leaf, t in layer.peft_tensors().items()}
    return tensors | {f"base_model.model.{name}": p for name, p in trainable_parameters(model).items()
                      if name.rpartition(".")[0] not in adapters}


def count_parameters(model):
    """(trainable, total). A 4-bit weight counts as the number of weights it stores, not its bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total + sum(m.stored_weight_count() for m in adapter_layers(model).values())


def weight_bytes(model):
    """Bytes of every weight as stored (QLoRA: 4-bit codes plus their quantization constants)."""
    return (sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
            + sum(m.extra_stored_bytes() for m in adapter_layers(model).values()))


# ===== Data: MNIST (and Fashion-MNIST) as normalized tensors resident on the training device =====
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = {name: dict(zip(IDX_FILES, md5.split())) for name, md5 in {  # torchvision's name: its files' MD5s
    "MNIST": "6bbc9ace898e44ae57da46a324031adb a25bea736e30d166cdddb491f175f624 "
             "2646ac647ad5339dbf082846283269ea 27ae3e4e09519cfbb04c329615203637",
    "FashionMNIST": "f4a8712d7a061bf5bd6d2ca38dc4d50a 9018921c3c673c538a1fc5bad174d6f9 "
                    "8181f5470baa50b63fa0f6fddb340f0a 15d484375f8d13e6eb1aabb0c3f46965"}.items()}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def download_dataset(data_dir, name):
    """torchvision's downloader (it tries its mirrors); its chatter shown only on success."""
    import torchvision.datasets
    log = io.StringIO()
    with redirect_stdout(log), redirect_stderr(log):
        getattr(torchvision.datasets, name)(data_dir, train=True, download=True)
    print(log.getvalue(), end="")


def ensure_dataset(data_dir, name="MNIST", download=True):
    """The dataset's four raw files, downloaded when missing, MD5-checked: DataError in one sentence."""
    raw, md5 = Path(data_dir) / name / "raw", DATASETS[name]
    missing, reason = [f for f in md5 if not (raw / f).is_file()], ""
    if missing and download:
        print(f"{name} not found in {raw}: downloading it with torchvision...")
        try:
            download_dataset(data_dir, name)
        except Exception as e:  # no network, a mirror down, a full disk...
            reason = f" The download failed ({type(e).__name__}: {one_line(e)})."
        missing = [f for f in md5 if not (raw / f).is_file()]
    if missing:
        raise DataError(
            f"{name} is missing from {raw}: {', '.join(missing)}.{reason} Put the four uncompressed IDX files "
            f"({', '.join(md5)}) in that folder, or run once with network access and torchvision "
            f"downloads them there; or point --data-dir at a folder that holds {name}/raw/.")
    for file, expected in md5.items():
        if (digest := hashlib.md5((raw / file).read_bytes()).hexdigest()) != expected:
            raise DataError(f"{raw / file} is damaged or truncated (MD5 {digest}, expected {expected}). "
                            f"Delete it and run again with network access, or replace it with a good copy.")
    return list(md5)


def load_dataset(data_dir, name="MNIST", download=True):
    """{'train': (uint8 pixels [N, 1, 28, 28], int64 labels), 'test': ...} of dataset `name`."""
    import torchvision.datasets
    ensure_dataset(data_dir, name, download)
    read = {split: getattr(torchvision.datasets, name)(data_dir, train=split == "train") for split in ("train", "test")}
    return {split: (d.data.unsqueeze(1), d.targets.long()) for split, d in read.items()}


def task_pixels(pixels, task):
    """The images of `task` (see TASKS), made from MNIST's uint8 pixels [N, 1, 28, 28]: exact, no resampling."""
    if task == "rotated":
        return torch.rot90(pixels, 1, dims=(2, 3))
    return pixels


def split_indices(n, val_size, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


def make_splits(data, device, task="mnist", val_size=VAL_SIZE, seed=0, train_size=None, test_size=None):
    """train/val/test (images, labels) of `task` on `device`, normalized once; subsets with --quick."""
    pixels, labels = data["train"]
    train_idx, val_idx = split_indices(len(labels), val_size, seed)
    if train_size is not None:
        train_idx = train_idx[:train_size]
    test_pixels, test_labels = data["test"]
    if test_size is not None:
        test_idx = split_indices(len(test_labels), test_size, 0)[1]
        test_pixels, test_labels = test_pixels[test_idx], test_labels[test_idx]

    def put(x, y):  # channels-last: the convolutions' fastest layout on the CPU
        x = (task_pixels(x, task).float() / 255 - MNIST_MEAN) / MNIST_STD  # once, not per sample
        return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    return {"train": put(pixels[train_idx], labels[train_idx]),
            "val": put(pixels[val_idx], labels[val_idx]),
            "test": put(test_pixels, test_labels)}


def epoch_order(n, seed, epoch):  # (seed, epoch) alone decide it: every method sees the same batches
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# ===== Training: one loop for every method =====
NUM_CLASSES = 10
EXPLODED = 10    # a training loss this many times above max(its first value, ln(classes)) has diverged
AT_CHANCE = 1.5  # a validation accuracy at most this many times chance after training learned nothing
LEARNED = 2 * AT_CHANCE  # ... and one that had reached this many times chance before falling there collapsed
SELECTION = "validation accuracy (ties: the lower validation loss)"  # chooses the kept epoch, early stop, rate
HISTORY_KEYS = ("train_loss", "val_loss", "val_acc", "lr", "epoch_time_s")  # train()'s per-epoch curves
FINISHED = ("ok", "unstable")  # a run with its numbers: unstable ones are kept, shown, not averaged or chosen


def selection_key(val_acc, val_loss):
    """The one selection criterion, for the epoch kept, early stopping and the rate chosen: larger is better."""
    return val_acc, -val_loss


def sync(device):
    """Wait for the GPU's queued work, so a timer reads finished work; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate(model, images, labels, batch_size=1000):
    """(mean cross-entropy, accuracy in %) over a whole split, in large batches."""
    model.eval()
    loss, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for i in range(0, len(labels), batch_size):
        logits = model(images[i:i + batch_size])
        loss += F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum()
    return loss.item() / len(labels), 100.0 * correct.item() / len(labels)


def snapshot(model):
    state = {k: p for k, p in model.named_parameters() if p.requires_grad} | dict(model.named_buffers())
    return {k: t.detach().clone() for k, t in state.items()}


@torch.no_grad()
def restore(model, state):
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for k, t in state.items():
        tensors[k].copy_(t)


def hook_groups(model):
    """{class: {name: module}} of the modules with train()'s hooks (AdapterLayer's; duck-typed for PEFT's AdaLoRA)."""
    groups = {}
    for name, module in model.named_modules():
        if all(hasattr(type(module), hook) for hook in ("regularizer", "on_step", "settled_at")):
            groups.setdefault(type(module), {})[name] = module
    return groups


class Budget(NamedTuple):
    epochs: int
    batch_size: int
    patience: int | None  # early stopping after this many epochs without a better one (None: never)


def check_divergence(epoch, train_loss, first_loss):
    """Diverged when the loss is not finite or explodes above where it started."""
    if not math.isfinite(train_loss):
        raise Diverged(f"diverged at epoch {epoch} (training loss {train_loss})")
    limit = EXPLODED * max(first_loss, math.log(NUM_CLASSES))
    if train_loss > limit:
        raise Diverged(f"diverged at epoch {epoch} (training loss {train_loss:.3g}, over {limit:.3g}: "
                       f"{EXPLODED}x where it started)")


def verdict(history, first_loss):
    """Diverged when the run ended at chance; else (epoch, accuracy) of a collapse after learning, or None."""
    chance = 100 / NUM_CLASSES
    if max(history["val_acc"]) <= AT_CHANCE * chance:
        raise Diverged(f"learned nothing: {max(history['val_acc']):.2f} % validation accuracy at best, at chance "
                       f"({chance:.0f} %)", too_slow=max(history["train_loss"]) <= first_loss)
    for epoch, acc in enumerate(history["val_acc"], 1):
        if acc <= AT_CHANCE * chance and max(history["val_acc"][:epoch]) > LEARNED * chance:
            return epoch, max(history["val_acc"][:epoch])
    return None


MEMORY_STEP = 2  # the step measured: from the second on, Adam's state exists, as in every later step


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 silenced: the profiler's C++ side writes lines there at every start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)


class TrainingMemory:
    """The memory of the training step run inside it. By accounting, what coexists at its peak: weights as stored,
    Adam's state, and the largest sum over the step of what autograd keeps (saved-tensor hooks, each storage once; not
    parameters, buffers, `exclude`) and the gradients written so far. Measured: the most bytes allocated above the
    step's start (CUDA's allocator, or torch.profiler's allocation events on the CPU) plus the model's bytes then."""

    def __init__(self, model, optimizer, device, exclude=()):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.skip = {(t.device, t.untyped_storage().data_ptr()) for t in (*model.parameters(), *model.buffers(),
                                                                           *exclude)}
        self.held, self.grads, self.kept, self.at_peak = {}, {}, 0, (0, 0)  # storage -> [holders, bytes]
        self.parts = self.peak = self.kept_at_backward = None

    def observe(self):  # (kept, gradients) where their sum is largest so far
        if self.kept + sum(self.grads.values()) > sum(self.at_peak):
            self.at_peak = (self.kept, sum(self.grads.values()))

    def pack(self, tensor):
        """What autograd keeps: a detached view (no cycle), counted once per storage until autograd drops it."""
        key, kept = (tensor.device, tensor.untyped_storage().data_ptr()), tensor.detach()
        if key not in self.skip:
            entry = self.held.setdefault(key, [0, tensor.untyped_storage().nbytes()])
            entry[0] += 1
            if entry[0] == 1:  # a storage not kept yet: its bytes count once, however many tensors view it
                self.kept += entry[1]
                self.observe()
            weakref.finalize(kept, self.release, key)
        return kept

    def unpack(self, kept):
        if self.kept_at_backward is None:  # the first use of a kept tensor: backward has begun, nothing freed yet
            self.kept_at_backward = self.kept
        return kept

    def release(self, key):
        entry = self.held[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.held[key]
            self.kept -= entry[1]

    def written(self, p):  # a gradient accumulated into p.grad during backward
        self.grads[p] = p.grad.nbytes
        self.observe()

    def adam_bytes(self):
        return sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))

    def __enter__(self):
        sync(self.device)
        self.before = weight_bytes(self.model) + self.adam_bytes() + sum(  # with last step's gradients
            p.grad.nbytes for p in self.model.parameters() if p.grad is not None)
        self.stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:  # fd 2 quiet over the whole step: a free of last step's gradients warns there too
            self.stack.enter_context(quiet_stderr())
            self.profiler = self.stack.enter_context(torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True))
        self.stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
        for p in trainable_parameters(self.model).values():
            self.stack.callback(p.register_post_accumulate_grad_hook(self.written).remove)
        return self

    def __exit__(self, *exc):
        self.stack.close()
        sync(self.device)
        if self.device.type == "cuda":
            rise = torch.cuda.max_memory_allocated(self.device) - self.start
        else:  # every allocation (+) and free (-), in time order
            events = sorted((e.start_ns(), e.nbytes()) for e in self.profiler.profiler.kineto_results.events()
                            if e.name() == "[memory]")
            rise = max(itertools.accumulate(nbytes for _, nbytes in events), default=0)
        trained = sum(p.nbytes for p in trainable_parameters(self.model).values())
        self.parts = {"frozen_weights": weight_bytes(self.model) - trained, "trainable_weights": trained,
                      "gradients": self.at_peak[1], "optimizer": self.adam_bytes(), "activations": self.at_peak[0]}
        self.parts["total"] = sum(self.parts.values())
        self.peak = self.before + max(rise, 0)
        return False


def training_step(model, optimizer, groups, images, labels, step, total_steps):
    """One optimizer step on the loss plus the adapter classes' terms; returns the task's loss."""
    optimizer.zero_grad(set_to_none=True)  # last step's gradients freed before this forward pass keeps its own
    loss = F.cross_entropy(model(images), labels)
    terms = [term for cls, modules in groups.items()
             if (term := cls.regularizer(modules, step, total_steps)) is not None]
    (loss + sum(terms) if terms else loss).backward()
    optimizer.step()
    for cls, modules in groups.items():
        cls.on_step(modules, step, total_steps)
    return loss


def train(model, splits, lr, budget, seed, log=print):
    """Adam, cosine rate to 0; ends in its best epoch's state (early stopping with patience); Diverged if it fails."""
    params, groups = trainable_parameters(model), hook_groups(model)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    images, labels = splits["train"]
    n, epochs, batch_size = len(labels), budget.epochs, budget.batch_size
    total = epochs * math.ceil(n / batch_size)
    settled = max((cls.settled_at(modules, total) for cls, modules in groups.items()), default=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    history, best = {key: [] for key in HISTORY_KEYS}, {"key": (-math.inf,), "epoch": 0, "state": snapshot(model)}
    memory = TrainingMemory(model, optimizer, images.device, exclude=[images])  # on this run's step MEMORY_STEP
    first_loss, step = None, 0
    sync(images.device)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        history["lr"].append(optimizer.param_groups[0]["lr"])
        order = epoch_order(n, seed, epoch).to(images.device)
        model.train()
        loss_sum = torch.zeros((), device=images.device)  # summed on the device: no sync per step
        # a progress bar with rate and time left, shown only on a terminal (disable=None), so logs stay clean
        for i in tqdm(range(total // epochs), desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, disable=None):
            step, idx = step + 1, order[i * batch_size:(i + 1) * batch_size]
            with memory if step == min(MEMORY_STEP, total) else contextlib.nullcontext():
                loss = training_step(model, optimizer, groups, images[idx], labels[idx], step, total)
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            if first_loss is None:
                first_loss = loss.item()  # the one sync of the run: where the loss started
        train_loss = loss_sum.item() / n
        check_divergence(epoch, train_loss, first_loss)
        val_loss, val_acc = evaluate(model, *splits["val"])
        if not math.isfinite(val_loss):  # the last steps broke the weights: a run to fail, not a NaN to record
            raise Diverged(f"diverged at epoch {epoch} (validation loss {val_loss})")
        for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("val_acc", val_acc),
                           ("epoch_time_s", time.perf_counter() - epoch_start)):
            history[key].append(value)
        log(f"Epoch {epoch}, Loss: {train_loss:.4f}, Learning Rate: {history['lr'][-1]:.6f}, "
            f"Val Accuracy: {val_acc:.2f}% ({history['epoch_time_s'][-1]:.1f} s)")
        if step < settled:  # the structure is not final yet (a pruning window still open): nothing to keep
            continue
        if selection_key(val_acc, val_loss) > best["key"]:
            best = {"key": selection_key(val_acc, val_loss), "epoch": epoch, "state": snapshot(model)}
        elif budget.patience is not None and epoch - best["epoch"] >= budget.patience and epoch < epochs:
            log(f"Early stopping at epoch {epoch}")
            break
    sync(images.device)
    train_time = time.perf_counter() - start
    restore(model, best["state"])
    collapsed = verdict(history, first_loss)
    return {"history": history, "epochs_run": len(history["train_loss"]), "best_epoch": best["epoch"],
            "train_time_s": train_time, "memory": memory.parts, "peak_bytes": memory.peak,
            "collapsed": collapsed}


# ===== Measurement: parameters, and training memory without training =====
def step_memory(model, batch_size, total_steps):
    """TrainingMemory of step MEMORY_STEP as train() takes it, on random images: shapes decide memory."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 1, 28, 28, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g).to(device)
    index = torch.arange(batch_size, device=device)  # a batch gathered in the step, as train() gathers one
    model.train()
    optimizer, groups = torch.optim.Adam(trainable_parameters(model).values(), lr=1e-3), hook_groups(model)
    memory = TrainingMemory(model, optimizer, device)
    for step in range(1, MEMORY_STEP + 1):
        with memory if step == MEMORY_STEP else contextlib.nullcontext():
            training_step(model, optimizer, groups, images[index], labels[index], step, total_steps)
    return memory


def fmt_mib(b):
    return f"{b / 2**20:.2f}"


def sweep_name(record):  # a memory sweep's column: the method, and its arm
    return display(record["method"]) + (" recomputing" if record.get("recompute") else "")


def step_estimate(width, batch):
    """Bytes a step needs at this width and batch, from the shapes: above every method's accounting."""
    activations = 28 * 28 + width * (16 * (24 * 24 + 12 * 12) + 32 * (8 * 8 + 4 * 4) + 256) + NUM_CLASSES
    return 4 * (4 * count_parameters(CNN(width))[1] + 3 * batch * activations)


def available_memory(device):
    """Bytes free for a step: the GPU's, or the system's (or its cgroup's) on the CPU; None unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        free.append(1024 * int(next(l for l in meminfo if l.startswith("MemAvailable:")).split()[1]))
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: a limit ("max" when none) and what is used
        cgroup = Path("/sys/fs/cgroup")
        free.append(int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text()))
    return min(free, default=None)


def memory_sweep(args, device, log=print):
    """Every method's training memory per width and batch, one step on fresh CNNs; adapters plain and recomputing."""
    records = []
    for width in args.memory_widths:
        torch.manual_seed(args.seed)
        base = CNN(width).to(device)
        for batch in args.memory_batches:
            point = []
            for method in (m for m in args.methods if m != "base"):
                for recompute in (False, True) if adapter_class(method) else (False,):
                    arm = argparse.Namespace(**vars(args) | {"recompute": recompute})
                    model = finetuning_copy(base, method, args.rank, arm).to(memory_format=torch.channels_last)
                    steps = args.finetune_epochs * math.ceil((60_000 - VAL_SIZE) / batch)  # a run's: the hooks'
                    memory = step_memory(model, batch, steps)
                    point.append({"method": method, "recompute": recompute, "width": width, "batch_size": batch,
                                  "memory": memory.parts, "peak_bytes": memory.peak,
                                  "kept_at_backward": memory.kept_at_backward})
            records += point
            log(f"width {width}, batch {batch}: " + ", ".join(
                f"{sweep_name(r)} {fmt_mib(r['memory']['total'])} ({fmt_mib(r['peak_bytes'])})" for r in point)
                + " MiB by accounting (measured)")
    return records


@torch.inference_mode()
def right_images(model, images, labels, batch_size=1000):
    """Which images the model gets right, as packed bits in hex: runs compared image by image."""
    model.eval()
    right = torch.cat([model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]
                       for i in range(0, len(labels), batch_size)])
    return np.packbits(right.cpu().numpy()).tobytes().hex()


def measure(model, fit, test_loss, test_acc):
    trainable, total = count_parameters(model)
    adapted = adapter_layers(model).values()  # their frozen W (biases excluded)
    return {"status": "ok", "test_acc": test_acc, "test_loss": test_loss, "trainable_params": trainable,
            "total_params": total, "memory": fit["memory"], "peak_bytes": fit["peak_bytes"],
            # what its saved folder holds (pruned components dropped): the trained parameters for all but those
            "stored_params": sum(t.numel() for t in peft_tensors(model).values()),
            "frozen_weight_bytes": sum(m.frozen_weight_bytes() for m in adapted),
            "frozen_weight_fp32_bytes": sum(4 * math.prod(m.weight_shape) for m in adapted),
            **{k: fit[k] for k in ("train_time_s", "epochs_run", "best_epoch", "history")}}


# ===== Saved models: whole CNNs, and adapter folders that PEFT loads as they are =====
def write_atomic(path, content):
    """Text, a PNG figure or tensors written whole or not at all (WriteError names the file)."""
    path = Path(path)
    try:
        if isinstance(content, str):
            data = content.encode()
        elif path.suffix == ".safetensors":
            from safetensors.torch import save
            data = save(content)
        else:
            buffer = io.BytesIO()
            if hasattr(content, "savefig"):
                content.savefig(buffer, dpi=120, format="png")
            else:
                torch.save(content, buffer)
            data = buffer.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the results from the user's group
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise WriteError(f"cannot write {path.name} in {path.parent} ({e.strerror or one_line(e, 120)})") from None


def read_model_file(path, read):
    """read(path), any failure (missing, truncated, not ours, a pickle with code) as one sentence naming it."""
    try:
        return read(path)
    except Exception as e:
        detail = one_line(str(e).split("Please file an issue")[0], 160)
        raise ModelFileError(f"{path} cannot be read ({type(e).__name__}: {detail})") from None


def load_plain(path, device):
    """A method saved as a whole CNN state dict (the base, full fine-tuning), loaded back at its width."""
    state = read_model_file(path, lambda p: torch.load(p, map_location=device, weights_only=True))
    try:  # built on the meta device, so no random init is drawn: loading must not move the global RNG that the
        with torch.device("meta"):  # next run seeds and draws its adapters' init and dropout from
            model = CNN(state["conv1.weight"].shape[0] // 16)
        model.load_state_dict(state, assign=True)
    except Exception as e:
        raise ModelFileError(f"{path} does not hold this CNN's weights ({type(e).__name__})") from None
    return model


MODEL_FILES = {"base": "base_model.pt", "full": "full_finetuned.pt", "head": "head_finetuned.pt"}


def saved_model_file(out_dir, method, seed, rank=None):
    """Where a run's model is saved: a CNN state dict, or an adapter folder in PEFT's format."""
    folder = Path(out_dir) / f"seed{seed}"
    if adapter_class(method):
        return folder / "adapters" / f"{method}_r{rank}"
    return folder / MODEL_FILES[method]


def file_digest(path):
    """SHA-256 of a saved model: a file, or an adapter folder (every file in it, by name)."""
    digest = hashlib.sha256()
    for entry in sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]:
        # anything else in a folder (a subfolder, a pipe) changes the digest by its name, never read
        digest.update(entry.name.encode() + b"\0" + (entry.read_bytes() if entry.is_file() else b"(not a file)"))
    return digest.hexdigest()


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # what PEFT reads
ADAPTER_INFO = "training_info.json"  # what only this project needs, in a file PEFT never opens


def save_adapter(model, method, rank, args, folder):
    """A folder PeftModel.from_pretrained(CNN(), folder) loads as it is, and training_info.json beside."""
    folder, layers, args = Path(folder), adapter_layers(model), method_settings(method, args)
    cls = type(next(iter(layers.values())))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "bias": args.bias,
              "use_dora": False, "use_rslora": args.scaling == "rslora", "fan_in_fan_out": False,
              "init_lora_weights": True,
              "target_modules": [full for *_, full, _ in adaptable_layers(CNN(), args.train_head)],
              "modules_to_save": [CNN.head] if args.train_head else None, **cls.peft_config(layers)}
    info = {"method": method, "task": args.task, "base_model": "../../base_model.pt (the CNN of the same seed)",
            **cls.record(layers)}
    write_atomic(folder / ADAPTER_WEIGHTS, {key: t.detach().cpu().contiguous()  # trained tensors only
                                            for key, t in peft_tensors(model).items()})
    write_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))
    write_atomic(folder / ADAPTER_INFO, json.dumps(info, indent=2))
    return folder


def load_adapter(base_checkpoint, folder, device="cpu", method=None):
    """An adapted model rebuilt from a base checkpoint and an adapter folder (ours, or PEFT's own)."""
    folder = Path(folder)
    config = read_model_file(folder / ADAPTER_CONFIG, lambda p: json.loads(p.read_text()))
    info = {}
    if (folder / ADAPTER_INFO).is_file():
        info = read_model_file(folder / ADAPTER_INFO, lambda p: json.loads(p.read_text()))
    method = method or info.get("method") or ("dora" if config.get("use_dora") else "lora")
    if not (isinstance(method, str) and method in METHODS and adapter_class(method)):
        raise ModelFileError(f"{folder} holds an adapter of a method this script does not know ({method!r})")
    cls = adapter_class(method).loads_as or adapter_class(method)
    from safetensors.torch import load_file
    tensors = read_model_file(folder / ADAPTER_WEIGHTS, lambda p: load_file(p, device=str(device)))
    model = load_plain(base_checkpoint, device)
    try:
        shape = AdapterConfig(**{k: config[k] for k in AdapterConfig._fields if k in config})
        add_adapters(model, cls, shape, train_head=bool(config.get("modules_to_save")))
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{folder / ADAPTER_CONFIG} is not a LoRA config of this CNN ({one_line(e)})") from None
    expected = peft_tensors(model)
    if set(tensors) != set(expected):
        raise ModelFileError(f"{folder} does not match a {method} adapter of this CNN (missing "
                             f"{sorted(set(expected) - set(tensors))}, extra {sorted(set(tensors) - set(expected))})")
    try:
        with torch.no_grad():
            for key, ours in expected.items():
                ours.copy_(tensors[key].reshape(ours.shape))
    except RuntimeError as e:  # a tensor of another shape: another rank, another layer size
        raise ModelFileError(f"{folder} does not match a {method} adapter of this CNN ({e})") from None
    return model


# ===== Results over seeds: every run kept; means, spreads and paired differences =====
def t_p_value(t, df):
    """Two-sided P(|T| >= |t|) for Student's t with df (real) degrees of freedom."""
    from scipy.stats import t as student  # imported where used: `import main` stays quick
    return float(2 * student.sf(abs(t), df))


def t_975(df):
    """Student's t quantile t(0.975, df), 2.5 % in each tail: a 95 % interval's half-width in standard errors."""
    from scipy.stats import t as student
    return float(student.ppf(0.975, df))


def mean_std_ci(values):
    """Mean, standard deviation and 95 % t-interval over seeds (one value: no spread, no interval)."""
    values = list(values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"n": len(values), "mean": mean, "std": None, "ci95": None, "values": values}
    std = statistics.stdev(values)
    half = t_975(len(values) - 1) * std / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": values}


SAME_FOR_EVERY_SEED = ("trainable_params", "total_params", "memory", "frozen_weight_bytes", "frozen_weight_fp32_bytes",
                       "full_model_file_bytes")  # shapes and byte counts: a seed changes values, not sizes
PER_SEED_SIZES = ("stored_params", "file_bytes")  # what is kept after pruning: each seed prunes its own way


def run_rank(method, rank):
    return rank if adapter_class(method) else None


def main_runs(results):
    return [r for r in results["runs"] if r["rank"] == run_rank(r["method"], results["config"]["rank"])]


def ok_runs(runs, method):
    return [r for r in runs if r["method"] == method and r["status"] == "ok"]


def right_bits(right_hex, n):
    return np.unpackbits(np.frombuffer(bytes.fromhex(right_hex), dtype=np.uint8))[:n].astype(bool)


def crossed_interval(d):
    """Mean and 95 % interval of an S x n table d[s, i] of per-image differences (S seeds, the same n images), each
    noise once: d = mean + seed + image + error, crossed. Var(mean) = sigma_seed^2 / S + sigma_image^2 / n
    + sigma_error^2 / (nS), estimated MS_seed / (nS) + max(0, MS_image - MS_error) / (nS): the images' spread holds the
    error again, so it is taken out there. Student's t at Satterthwaite's df. One seed: the images' spread alone."""
    d = np.asarray(d, dtype=np.float64)
    seeds, n = d.shape
    mean = float(d.mean())
    ms_image = seeds * float(d.mean(axis=0).var(ddof=1)) if n > 1 else 0.0
    if seeds == 1:
        parts = [(ms_image / n, n - 1)]
    else:
        ms_seed = n * float(d.mean(axis=1).var(ddof=1))
        residual = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0) + mean
        ms_error = float((residual ** 2).sum()) / ((seeds - 1) * (n - 1))
        parts = [(ms_seed / (n * seeds), seeds - 1)]  # the seed term: df S - 1
        if ms_image > ms_error:  # (c_image MS_image - c_error MS_error): both enter Satterthwaite's sum
            parts += [(ms_image / (n * seeds), n - 1), (-ms_error / (n * seeds), (seeds - 1) * (n - 1))]
    var = sum(v for v, _ in parts)
    stats = {"mean": mean, "se": math.sqrt(max(var, 0.0)), "df": float(n - 1), "ci95": [mean, mean]}
    if var > 0:
        df = var ** 2 / sum(v ** 2 / k for v, k in parts if k > 0)
        half = t_975(df) * stats["se"]
        stats |= {"df": df, "ci95": [mean - half, mean + half]}
    return stats


def paired_interval(pairs, n):
    """crossed_interval of d[s, i] = 100 (a right - b right) on test image i in seed s."""
    return crossed_interval([100 * (right_bits(a, n).astype(float) - right_bits(b, n)) for a, b in pairs])


def paired_lead(a_hex, b_hex, n):
    """(images a gets right and b not, minus the reverse; its standard error) on the same n images."""
    d = paired_interval([(a_hex, b_hex)], n)
    return round(d["mean"] * n / 100), d["se"] * n / 100


def paired_stats(differences, rights, n):
    """Per-seed differences as mean_std_ci gives them, with paired_interval's mean, interval, se, df and noise."""
    stats = mean_std_ci(differences)
    if not all(a and b for a, b in rights):
        return stats | {"se": stats["std"] and stats["std"] / math.sqrt(stats["n"]), "df": stats["n"] - 1,
                        "noise": "seed"}
    both = paired_interval(rights, n)
    return stats | {k: both[k] for k in ("mean", "ci95", "df", "se")} | {
        "noise": "seed and test-set" if len(rights) > 1 else "test-set"}


def paired_runs(pairs, n):
    """paired_stats of (run, its reference's run of the same seed) pairs."""
    return paired_stats([a["test_acc"] - b["test_acc"] for a, b in pairs],
                        [(a.get("test_right"), b.get("test_right")) for a, b in pairs], n)


def paired_difference(results, method, ref):
    """Test accuracy of `method` minus `ref`, paired seed by seed, with its interval (or None)."""
    runs = {m: {r["seed"]: r for r in ok_runs(main_runs(results), m)} for m in (method, ref)}
    pairs = [(runs[method][s], runs[ref][s]) for s in sorted(set(runs[method]) & set(runs[ref]))]
    return paired_runs(pairs, results["config"].get("test_size")) if pairs else None


def holm(p_values):
    """Holm's step-down adjustment of a family of p values."""
    order, adjusted, running = sorted(range(len(p_values)), key=lambda i: p_values[i]), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def primary_contrasts(results):
    """Each adapter against full FT and head only, the others against LoRA, a variant against its row: Holm-adjusted."""
    adapters = [m for m in results["methods"] if adapter_class(m)]
    named = ([(m, ref) for ref in ("full", "head") for m in adapters] + [(m, "lora") for m in adapters if m != "lora"]
             + [(m, variant_of(m)) for m in adapters if variant_of(m) not in (None, "lora")])  # a variant: its row
    rows = []
    for method, ref in (pair for pair in named if pair[1] in results["methods"]):
        if (d := paired_difference(results, method, ref)) and d["se"] is not None:
            p = t_p_value(d["mean"] / d["se"], d["df"]) if d["se"] > 0 else float(d["mean"] == 0)
            rows.append({"method": method, "ref": ref, "mean": d["mean"], "ci95": d["ci95"], "p": p,
                         "noise": d["noise"]})
    for r, adjusted in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = adjusted
    return rows


def summarize(results):
    """One row per method of the main comparison (and "base_on_task": the base on a shifted task's test set)."""
    runs, summary = main_runs(results), {}
    for method in results["methods"]:
        mine = [r for r in runs if r["method"] == method]
        ok = ok_runs(runs, method)
        if not ok:
            if mine:
                summary[method] = {"status": mine[-1]["status"], "reason": mine[-1]["reason"]}
            continue
        summary[method] = {
            "status": "ok", "seeds": [r["seed"] for r in ok],
            "failed": [f"seed {r['seed']}: {r['status']} ({r['reason']})" for r in mine if r["status"] != "ok"],
            "test_acc": mean_std_ci(r["test_acc"] for r in ok),
            "train_time_s": mean_std_ci(r["train_time_s"] for r in ok),
            "peak_bytes": (None if any(r.get("peak_bytes") is None for r in ok)  # studies before it was measured
                           else mean_std_ci(r["peak_bytes"] for r in ok)),
            "epochs_run": [r["epochs_run"] for r in ok], "best_epoch": [r["best_epoch"] for r in ok],
            "lr": ok[0]["lr"], **{k: ok[0][k] for k in SAME_FOR_EVERY_SEED},
            **{k: mean_std_ci(r[k] for r in ok) for k in PER_SEED_SIZES},
            "merge_gap": max((r["merge_gap"] for r in ok if "merge_gap" in r), default=None),
            "vs": {} if method == "base" else {ref: paired_difference(results, method, ref) for ref in ("full", "lora")
                                                if ref != method and ref in results["methods"]}}
        if "test_acc_in_peft" in ok[0]:  # as PEFT loads its folder (QLoRA: on the fp32 base), seed by seed
            summary[method]["in_peft"] = {"test_acc": mean_std_ci(r["test_acc_in_peft"] for r in ok),
                                          "vs_trained": paired_stats(
                                              [r["test_acc_in_peft"] - r["test_acc"] for r in ok],
                                              [(r.get("test_right_in_peft"), r.get("test_right")) for r in ok],
                                              results["config"].get("test_size"))}
        if method == "base" and "task_test_acc" in ok[0]:
            summary["base_on_task"] = {"status": "ok", "seeds": [r["seed"] for r in ok], "failed": [],
                                       "test_acc": mean_std_ci(r["task_test_acc"] for r in ok)}
    return summary


RECORD_KINDS = ("runs", "other_runs", "lr_grid", "budget_check")  # results.json's lists of records


def study_time_s(results):
    """Training time of every record, each run once (a run finished from a grid run counts in the grid)."""
    return sum(r.get("train_time_s", 0.0) for kind in RECORD_KINDS for r in results[kind] if not r.get("from_grid"))


def busy_note(results):
    """A sentence when the load exceeded the cores plus one as runs started or ended, else ""."""
    timed = [r for kind in RECORD_KINDS for r in results[kind] if "load" in r]
    cores = results["environment"].get("cores") or os.cpu_count()
    busy = [r for r in timed if max(r["load"]) > cores + 1]
    return (f"The machine was busy (load above its {cores} cores plus one) as {len(busy)} of {len(timed)} runs "
            f"started or ended: their times are not comparable across methods." if busy else "")


def seeds_finished(summary):
    return max((len(row["seeds"]) for row in summary.values() if row["status"] == "ok"), default=1)


def rank_sweep(results):
    """{adapter method: a point per rank, with paired differences to full FT and to LoRA there}."""
    runs, sweep, n = results["runs"] + results["other_runs"], {}, results["config"].get("test_size")
    full = {r["seed"]: r for r in ok_runs(runs, "full")}
    lora = {(r["seed"], r["rank"]): r for r in ok_runs(runs, "lora")}
    for method in (m for m in results["methods"] if adapter_class(m)):
        points = []
        mine = ok_runs(runs, method)
        for rank in sorted({r["rank"] for r in mine}):
            ok = [r for r in mine if r["rank"] == rank]
            vs = {ref: [(r, by[key]) for r in ok if (key := r["seed"] if ref == "full" else (r["seed"], rank)) in by]
                  for ref, by in (("full", full), ("lora", lora if method != "lora" else {}))}
            points.append({"rank": rank, "lr": ok[0]["lr"], "trainable_params": ok[0]["trainable_params"],
                           "stored_params": statistics.fmean(r["stored_params"] for r in ok),
                           "test_acc": mean_std_ci(r["test_acc"] for r in ok),
                           **{f"vs_{ref}": paired_runs(pairs, n) if pairs else None for ref, pairs in vs.items()}})
        if len(points) > 1:
            sweep[method] = points
    return sweep


# ===== Merging: the adapters folded into plain layers =====
def merge_adapters(model):
    """A copy of an adapted model with every adapter folded into a plain layer: the base architecture again."""
    merged = copy.deepcopy(model)
    for parent in list(merged.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AdapterLayer):
                setattr(parent, name, child.merge())
    return merged


@torch.inference_mode()
def merge_gap(model, images):
    model.eval()
    return (model(images) - merge_adapters(model)(images)).abs().max().item()


# ===== Results files: results.json, results.md and the console summary =====
def scale_formula(config):  # the update's factor in words, and the adapter settings a reader must be told
    return ("alpha / sqrt(r)" if config.get("scaling") == "rslora" else "alpha / r") + (
        f"; biases trained ({config['bias']})" if config.get("bias", "none") != "none" else "") + (
        "; the dynamic rank's budget in stored parameters" if config.get("dyn_budget") == "params" else "")


def fmt_stat(stats, fmt="{:.2f}", scale=1.0):
    """'mean ± std' (several seeds) or the one value; never a made-up spread."""
    mean = fmt.format(stats["mean"] / scale)
    return mean if stats["std"] is None else f"{mean} ± {fmt.format(stats['std'] / scale)}"


def fmt_count(stats):
    mean = f"{stats['mean']:,.0f}"
    return mean if not stats["std"] else f"{mean} ± {stats['std']:,.0f}"


def signed_end(value):
    """An interval's end with its sign, more digits where two would print 0.00."""
    digits = next((d for d in (2, 3, 4) if value == 0 or round(value, d) != 0), 4)
    return f"{value:+.{digits}f}"


def fmt_ci(stats, signed=False):
    f = "{:+.2f}" if signed else "{:.2f}"
    if stats["ci95"] is None:
        return f"{f.format(stats['mean'])} (1 seed)" if signed else "- (1 seed)"
    low, high = stats["ci95"]
    return (f"{f.format(stats['mean'])} [{signed_end(low)}, {signed_end(high)}]" if signed
            else f"[{f.format(low)}, {f.format(high)}]")


def label(method, task):  # the base's own accuracy is on MNIST: on a shifted task its rows say so
    if method == "base_on_task":
        return f"Base, not fine-tuned ({task})"
    return f"{display(method)} (MNIST)" if method == "base" and task != "mnist" else display(method)


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
                     + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


RESULT_COLUMNS = (  # (header in results.md, cell of a summary row)
    ("lr", lambda row: f"{row['lr']:g}" if row.get("lr") else "-"),
    ("test acc (%)", lambda row: fmt_stat(row["test_acc"])),
    ("95 % CI", lambda row: fmt_ci(row["test_acc"])),
    ("vs Full FT (points, paired 95 % CI)", lambda row: fmt_ci(row["vs"]["full"], signed=True)
     if row["vs"].get("full") else "-"),
    ("trainable params", lambda row: f"{row['trainable_params']:,}"),
    ("stored params", lambda row: fmt_count(row["stored_params"])),
    ("% of total", lambda row: f"{100 * row['trainable_params'] / row['total_params']:.2f}"),
    ("training memory (MiB)", lambda row: fmt_mib(row["memory"]["total"])),
    ("frozen W stored / fp32", lambda row: "-" if not row["frozen_weight_fp32_bytes"]
     else f"{100 * row['frozen_weight_bytes'] / row['frozen_weight_fp32_bytes']:.1f} %"),
    ("train time (s)", lambda row: fmt_stat(row["train_time_s"], "{:.1f}")),
    ("epochs (best)", lambda row: f"{'/'.join(map(str, row['epochs_run']))} "
                                  f"({'/'.join(map(str, row['best_epoch']))})"),
)
BEFORE_FINE_TUNING = ("lr", "test acc (%)", "95 % CI")  # what the row of the base on a shifted task can fill


def comparison_table(results):
    rows = []
    for method, row in results["summary"].items():
        name = label(method, results["config"]["task"])
        if row["status"] != "ok":
            rows.append([name] + [f"{row['status']}: {row['reason']}" if h == "test acc (%)" else "-" if h == "lr"
                                  else "" for h, _ in RESULT_COLUMNS])
            continue
        if row["failed"]:
            name += f" ({len(row['failed'])} run(s) {'; '.join(row['failed'])})"
        rows.append([name] + [cell(row) if method != "base_on_task" or h in BEFORE_FINE_TUNING else "-"
                              for h, cell in RESULT_COLUMNS])
    return table(["method"] + [h for h, _ in RESULT_COLUMNS], rows)


MEMORY_PARTS = (  # (key in a run's "memory", header in results.md and the plot)
    ("frozen_weights", "frozen weights"), ("trainable_weights", "trainable weights"), ("gradients", "gradients"),
    ("optimizer", "optimizer (Adam)"), ("activations", "kept for backward"))
PEAK_HOW = {"cuda": "CUDA allocator", "cpu": "torch.profiler"}  # what measured the peak, by device type


def memory_table(results):
    """Training memory per method in parts by accounting, and the measured peak beside it."""
    summary = {m: row for m, row in results["summary"].items() if row["status"] == "ok" and "memory" in row}
    measured = any(row["peak_bytes"] is not None for row in summary.values())
    full = summary.get("full", {}).get("memory", {}).get("total")
    rows = []
    for method, row in summary.items():
        memory, peak = row["memory"], row["peak_bytes"]
        rows.append([display(method)] + [fmt_mib(memory[key]) for key, _ in MEMORY_PARTS] + [
            fmt_mib(memory["total"]), f"{memory['total'] / full:.2f}x" if full else "-"]
            + ([fmt_stat(peak, scale=2**20), f"{(peak['mean'] - memory['total']) / 2**20:+.2f}"] if peak else
               ["-", "-"] if measured else []))
    how = PEAK_HOW[results["environment"]["device"]]
    return table(["method"] + [header for _, header in MEMORY_PARTS] + ["total (accounting)", "vs Full FT"]
                 + ([f"measured peak ({how})", "measured minus accounting"] if measured else []), rows)


AFTER_TRAINING_COLUMNS = (  # (header in results.md, cell of a summary row)
    ("saved file (KiB)", lambda row: f"{row['file_bytes']['mean'] / 2**10:.1f}"),
    ("vs full model", lambda row: f"{100 * row['file_bytes']['mean'] / row['full_model_file_bytes']:.1f} %"),
    ("largest logit change merging makes", lambda row: f"{row['merge_gap']:.1e}" if row.get("merge_gap") else "-"),
)


def after_training_table(results):
    rows = [[display(m)] + [cell(row) for _, cell in AFTER_TRAINING_COLUMNS] for m, row in results["summary"].items()
            if row["status"] == "ok" and m != "base_on_task"]
    return table(["method"] + [header for header, _ in AFTER_TRAINING_COLUMNS], rows)


def rank_sweep_table(results):
    return table(["method", "rank", "lr", "trainable params", "stored params", "test acc (%)", "95 % CI",
                  "vs Full FT (points, paired 95 % CI)", "vs LoRA at this rank"], [
        [display(method), p["rank"], f"{p['lr']:g}", f"{p['trainable_params']:,}", f"{p['stored_params']:,.0f}",
         fmt_stat(p["test_acc"]), fmt_ci(p["test_acc"])] + [fmt_ci(p[k], signed=True) if p.get(k) else "-"
                                                            for k in ("vs_full", "vs_lora")]
        for method, points in results["rank_sweep"].items() for p in points])


def sweep_points(results, key="total"):
    """{(width, batch): {column: bytes}} of the sweep: the accounting's total, or ("peak") the measured peak."""
    points = {}
    for r in results["memory_sweep"]:
        value = r["memory"]["total"] if key == "total" else r.get("peak_bytes")
        if value is not None:
            points.setdefault((r["width"], r["batch_size"]), {})[sweep_name(r)] = value
    return points


def memory_sweep_table(results, key="total"):
    """Each column's training memory at every width and batch size, and its ratio to full fine-tuning's."""
    points, full = sweep_points(results, key), display("full")
    columns = list(dict.fromkeys(m for totals in points.values() for m in totals))
    return table(["width", "batch"] + columns, [
        [width, batch] + [fmt_mib(totals[m]) + (f" ({totals[m] / totals[full]:.2f}x)" if full in totals
                                                and m != full else "") for m in columns]
        for (width, batch), totals in points.items()])


def crossover_table(results, key="total"):
    """Per width, the largest batch at which each column takes less memory than full FT (None: not measured)."""
    points, full = sweep_points(results, key), display("full")
    if not any(full in totals for totals in points.values()):
        return None
    widths = list(dict.fromkeys(width for width, _ in points))
    columns = list(dict.fromkeys(m for totals in points.values() for m in totals if m != full))

    def cell(width, column):
        mine = {b: totals for (w, b), totals in points.items() if w == width and full in totals}
        below = [b for b, totals in mine.items() if column in totals and totals[column] < totals[full]]
        return "none" if not below else f"{max(below)} (all swept)" if max(below) == max(mine) else str(max(below))
    return table(["method"] + [f"width {w} ({count_parameters(CNN(w))[1]:,} weights)" for w in widths],
                 [[m] + [cell(w, m) for w in widths] for m in columns])


def recompute_check(results):
    """A sentence on the sweep's recomputing adapters against full fine-tuning, at every point with both."""
    full = {(r["width"], r["batch_size"]): r for r in results["memory_sweep"] if r["method"] == "full"}
    arms = [(r, full[key]) for r in results["memory_sweep"]
            if r.get("recompute") and (key := (r["width"], r["batch_size"])) in full]
    if not arms:
        return None
    most = max(r["kept_at_backward"] - f["kept_at_backward"] for r, f in arms)
    total = sum(r["memory"]["total"] < f["memory"]["total"] for r, f in arms)
    peak = sum(r["peak_bytes"] < f["peak_bytes"] for r, f in arms)
    return (f"Recomputing adapters, at the {len(arms)} (adapter, width, batch) points where full fine-tuning was "
            f"measured too: kept for backward as backward begins, at most {most / 2**20:+.2f} MiB beyond full "
            f"fine-tuning's; below full fine-tuning in total by accounting at {total} of them, in measured peak "
            f"at {peak}.")


def contrasts_table(results):
    return table(["contrast", "difference (points, 95 % CI)", "interval holds", "p", "p, Holm", "verdict"], [
        [f"{display(c['method'])} − {display(c['ref'])}", fmt_ci(c, signed=True), f"{c['noise']} noise",
         f"{c['p']:.3f}", f"{c['p_holm']:.3f}", "beyond noise" if c["p_holm"] < 0.05 else "cannot tell"]
        for c in results["contrasts"]])


def margin_cell(rate, val_size):
    """The chosen rate's lead over the runner-up in validation images, ± its standard error."""
    if not rate.get("runner_up"):
        return ""
    lead, se = rate["margin_images"], rate["margin_se"]
    noise = " (within noise)" if abs(lead) < 2 * se else ""
    return f"{lead:+d} ± {se:.1f} of {val_size:,} over {rate['runner_up']:g}{noise}"


def grid_rates(results):
    main_rank = results["config"]["rank"]
    return ({(m, run_rank(m, main_rank)): rate for m, rate in results["learning_rates"].items()}
            | {(m, int(rank)): rate for m, by in results.get("sweep_rates", {}).items() for rank, rate in by.items()})


def lr_grid_table(results):
    chosen, n = grid_rates(results), results["config"]["val_size"]
    return table(["method", "rank", "lr", "val acc (%) at the kept epoch", "val loss", "epochs (kept)", "status",
                  "chosen: its lead over the runner-up, validation images (± SE)"], [
        [display(r["method"]), r["rank"] or "-", f"{r['lr']:g}" + (" (extension)" if r["extension"] else "")]
        + ([f"{r['val_acc']:.2f}", f"{r['val_loss']:.4f}", f"{r['epochs_run']} ({r['best_epoch']})"]
           if r["status"] in FINISHED else ["", "", ""])
        + [r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}",
           "✓ " + margin_cell(chosen[r["method"], r["rank"]], n)
           if chosen.get((r["method"], r["rank"]), {}).get("lr") == r["lr"] else ""]
        for r in results["lr_grid"]])


def budget_points(results):
    """{method: [(epochs, kept validation accuracy, status, record)]} of the budget check."""
    checked = {r["method"] for r in results["budget_check"]}
    first = [r for r in main_runs(results) if r["seed"] == results["seeds"][0] and r["method"] in checked]
    points = {}
    for r in results["budget_check"] + first:
        if r["status"] in FINISHED:
            accuracy = r["val_acc"] if "val_acc" in r else r["history"]["val_acc"][r["best_epoch"] - 1]
            points.setdefault(r["method"], []).append(
                (epoch_budget(results["config"], r["method"], r.get("epochs")), accuracy, r["status"], r))
    return {method: sorted(mine, key=lambda point: point[0]) for method, mine in points.items()}


def budget_table(results):
    """Validation accuracy at each budget, and the longest budget's lead over the comparison's, in images."""
    by_method = budget_points(results)
    budgets = sorted({epochs for mine in by_method.values() for epochs, *_ in mine})
    main_budget, n = epoch_budget(results["config"]), results["config"]["val_size"]
    rows = []
    for method, points in by_method.items():
        at = {e: (acc, status, r) for e, acc, status, r in points}
        longest = max(at)
        lead = "-"
        if longest != main_budget and main_budget in at:
            lead = "{:+d} ± {:.1f}".format(*paired_lead(at[longest][2]["val_right"],
                                                        at[main_budget][2]["val_right"], n))
        rows.append([display(method)] + [f"{at[e][0]:.2f}" + ("" if at[e][1] == "ok" else f" ({at[e][1]})")
                                         if e in at else "" for e in budgets] + [lead])
    return table(["method"] + [f"{e} epochs" + (" (the comparison's)" if e == main_budget else "") for e in budgets]
                 + [f"longest minus the comparison's, images of {n:,} (± SE)"], rows)


def rank_allocation_table(results):
    """Where a pruning method's rank went: each layer's final rank, per seed."""
    runs = sorted((r for r in main_runs(results) if r["status"] == "ok" and "rank_allocation" in r),
                  key=lambda r: results["methods"].index(r["method"]))  # by method, then seed
    layers = list(runs[0]["rank_allocation"]["ranks"]) if runs else []
    return table(["method", "seed"] + layers, [[display(r["method"]), r["seed"]] + [
        r["rank_allocation"]["ranks"][name] for name in layers] for r in runs])


def chosen_rates(results):
    groups = {}
    for method, rate in results["learning_rates"].items():
        how = ("chosen on validation from " + ", ".join(f"{lr:g}" for lr in rate["grid"])
               if rate["chosen_by"] == "validation grid" else f"from {rate['chosen_by']}")
        groups.setdefault(how, []).append(f"{display(method)} {rate['lr']:g}")
    return "Learning rates: " + "; ".join(f"{', '.join(names)} ({how})" for how, names in groups.items())


def who_won(results):
    """The verdict, worded as the paired intervals allow: accuracy, memory, parameters, time."""
    done = {m: r for m, r in results["summary"].items() if r["status"] == "ok" and m not in ("base", "base_on_task")}
    if not done:
        return []
    best = max(done, key=lambda m: done[m]["test_acc"]["mean"])
    ties = [display(m) for m in done if m != best and (d := paired_difference(results, m, best)) and d["ci95"]
            and d["ci95"][0] <= 0 <= d["ci95"][1]]
    lines = [f"Best test accuracy: {display(best)}, {fmt_stat(done[best]['test_acc'])} %; " + (
        f"these runs cannot tell it from {', '.join(ties)}" if ties else
        "every other method is below it beyond noise (paired 95 % intervals)") + (
        " (one seed: the intervals hold the test images' noise only; one seed cannot rank methods)"
        if seeds_finished(results["summary"]) == 1 else "")]
    adapters = [m for m in done if adapter_class(m)]
    for what, key, fmt in ((f"Least training memory (by accounting, one step at batch "
                            f"{results['config']['batch_size']})", lambda r: r["memory"]["total"],
                            lambda b: f"{fmt_mib(b)} MiB"),
                           ("Fewest stored parameters", lambda r: r["stored_params"]["mean"], "{:,.0f}".format),
                           ("Fastest training", lambda r: r["train_time_s"]["mean"], "{:.1f} s a run".format)):
        least = [f"{display(m)} {fmt(key(done[m]))}" for m in (min(group, key=lambda m: key(done[m]))
                                                                  for group in (done, adapters) if group)]
        lines.append(f"{what}: {least[0]}" + (f"; of the adapters, {least[1]}" if least[-1] != least[0] else ""))
    return lines


def add_summary(results):
    results["summary"], results["rank_sweep"] = summarize(results), rank_sweep(results)
    results["contrasts"] = primary_contrasts(results)
    return results


def memory_notation(results):
    if results.get("memory_accounting") != 2:  # a study measured with the loop before zero_grad came first
        return (f"Training memory = by accounting, on training step {MEMORY_STEP}, as its commit's code counted it "
                "(last step's gradients still allocated during the forward pass): weights as stored, gradients, "
                "Adam's state, and what autograd keeps for backward as backward begins. No peak was measured.")
    return (f"Training memory, on training step {MEMORY_STEP} (zero_grad first: last step's gradients are freed "
            "before the forward pass): by accounting, what coexists at the step's peak, the weights as stored "
            "(frozen: QLoRA's packed 4-bit codes and their constants; trainable), Adam's state, and the largest "
            "sum over the step of the activations autograd keeps for backward (saved-tensor hooks, each storage "
            "once, parameters and the resident dataset left out) and the gradients written so far. Measured peak "
            "= the most bytes allocated over that step above its start (CUDA: torch.cuda.max_memory_allocated; "
            "CPU: the allocation and free events of torch.profiler with profile_memory=True, summed in time "
            "order) plus the weights, Adam's state and last step's gradients alive at its start; what it holds "
            "beyond the accounting is transient: the kernels' buffers, the batch, the logits. Recomputing "
            "(--recompute): each adapter keeps only its layer's input for backward and computes the rest again.")


def results_markdown(results):
    env, config, seeds, code = results["environment"], results["config"], results["seeds"], results.get("code")
    parts = ["# Results"] + ([f"**QUICK RUN: a smoke test ({config['train_size']:,} training and "
                              f"{config['test_size']:,} test images, at most {QUICK_MAX_EPOCHS} epochs per method), "
                              f"not results.**"] if config["quick"] else [])
    about = f"Device: {env['device_name']}; torch {env['torch']}, bitsandbytes {env['bitsandbytes']}; {env['date']}."
    if code:
        about += (f" Code: main.py of commit {(code['commit'] or 'none (not in a git clone)')[:12]}"
                  f"{', edited' if code.get('main_py_edited') else ''} (SHA-256 {code['main_py_sha256'][:16]}...).")
    parts.append(about)
    if results["runs"]:
        spread = (f"Seeds: {', '.join(map(str, seeds))}: mean ± std over the seeds; 95 % CI: Student's t."
                  if len(seeds) > 1 else f"One seed ({seeds[0]}): single values, so no spread and no interval.")
        parts[-1] += (f" Fine-tuning task: {config['task']} ({TASKS[config['task']]}); {epoch_budget(config)} "
                      f"fine-tuning epochs, the update scaled by {scale_formula(config)}. {spread} "
                      f"{chosen_rates(results)}. Settings other than main.py's defaults: "
                      f"{changed_settings(config) or 'none'}. Training time of this study: "
                      f"{study_time_s(results) / 60:.1f} min (every run once, the grid and the checks included). "
                      f"{busy_note(results)}".rstrip())
        parts.insert(-1, "**Verdict.** " + " ".join(line + "." for line in who_won(results)))
        parts += [comparison_table(results)]
        parts += [f"{display(m)}'s adapter as PEFT loads it (as {display(adapter_class(m).peft_loads_as)} on the fp32 "
                  f"base): {fmt_stat(row['in_peft']['test_acc'])} % test accuracy, against {fmt_stat(row['test_acc'])} "
                  f"% as trained; the difference seed by seed {fmt_ci(row['in_peft']['vs_trained'], signed=True)} "
                  f"points ({row['in_peft']['vs_trained']['noise']} noise)."
                  for m, row in results["summary"].items() if "in_peft" in row]  # QLoRA: on fp32
        if results["contrasts"]:
            variants = any(variant_of(m) for m in results["methods"] if m in METHODS)
            parts += [f"Primary contrasts, the family main.py names for every study (each adapter against full "
                      f"fine-tuning and head only, "
                      f"the {'other adapters' if variants else 'two DoRAs and QLoRA'} against LoRA"
                      f"{', a variant against its own row' if variants else ''}), Holm-adjusted over these "
                      f"{len(results['contrasts'])}: "
                      f"the family-wise chance of any false \"beyond noise\" is 5 %. Every other difference is "
                      f"exploratory.", contrasts_table(results)]
        parts += [f"Training memory (MiB) by accounting, one measured training step at batch {config['batch_size']}, "
                  f"CNN width {config.get('width', 1)}:", memory_table(results)]
        parts += ["After training (Base, Full FT, Head only: the whole model's file; adapters: the adapter-only "
                  "file; merging: the largest over the seeds, on 1,000 test images):", after_training_table(results)]
    if any("rank_allocation" in r for r in main_runs(results)):
        start = next(r["rank_allocation"] for r in main_runs(results) if "rank_allocation" in r)
        parts += [f"Where the dynamic rank went: each layer's rank at the end ({start['components']} components a "
                  f"layer at the start; LoRA's budget: {start['target_rank']} in every layer):",
                  rank_allocation_table(results)]
    if results["rank_sweep"]:
        how = ("its rate chosen on that rank's own grid (--grid-per-rank)" if results.get("sweep_rates") else
               f"at the rate chosen at r = {config['rank']}")
        parts += [f"Rank sweep (the adapter methods at each rank, {how}; the update scaled by "
                  f"{scale_formula(config)}; {len(seeds)} seed(s)):", rank_sweep_table(results)]
    if results["lr_grid"]:
        parts += [f"Learning-rate grid (seed {seeds[0]}, main rank; chosen by {SELECTION}, then the lower rate; "
                  f"a run that failed or collapsed is never chosen):", lr_grid_table(results)]
    if results["budget_check"]:
        parts += [f"Budget check (seed {seeds[0]}, each method at its chosen rate, validation accuracy at the kept "
                  f"epoch): has the comparison's budget plateaued?", budget_table(results)]
    for key, how in (("total", "by accounting"), ("peak", f"measured ({PEAK_HOW[results['environment']['device']]})")):
        if sweep_points(results, key):
            parts += [f"Memory sweep, {how} (nothing trained: one step on a fresh CNN of each width; in brackets, the "
                      f"ratio to full fine-tuning's):", memory_sweep_table(results, key),
                      f"The largest batch of the sweep at which each method still trains in less memory than full "
                      f"fine-tuning, {how}, per CNN width:",
                      crossover_table(results, key) or "(none: full fine-tuning was not in --methods, so not measured)"]
    if results.get("memory_sweep") and (check := recompute_check(results)):
        parts.append(check)
    parts.append(("vs Full FT = test accuracy minus full fine-tuning's, seed by seed (same base, data order and "
                  "init), with the 95 % CI of that mean: the crossed seeds x test-images random-effects variance, "
                  "each noise once, Satterthwaite's df. An interval holding 0: these runs cannot tell the two "
                  "apart (not: they are equal). epochs (kept) = the epochs each seed ran, and in brackets the "
                  f"epoch kept (the best by {SELECTION}). stored params = what the saved folder holds. Lead over "
                  "the runner-up = images the chosen run gets right and the other not, minus the reverse, ± its "
                  "standard error (within noise: under two). " if results["runs"] else "")
                 + memory_notation(results))
    if results.get("provenance"):  # a committed study's own story: how it ran, reruns, merges
        parts += ["## Provenance", *results["provenance"]]
    return "\n\n".join(parts) + "\n"


DERIVED = ("summary", "rank_sweep", "contrasts")  # add_summary's, from the records: results.md's, not stored


def save_results(results, out_dir, records=True):
    """results.json (every record; not with records=False) and results.md."""
    add_summary(results)
    if records:
        write_atomic(Path(out_dir) / "results.json",
                     json.dumps({k: v for k, v in results.items() if k not in DERIVED}, indent=2))
    write_atomic(Path(out_dir) / "results.md", results_markdown(results))


# ===== Plots: one function per figure, drawn from results alone =====
PLOT_FILES = ("training_loss_comparison.png", "validation_accuracy_comparison.png", "test_accuracy_memory.png")
SWEEP_PLOT, LR_PLOT, MEMORY_PLOT = "rank_sweep.png", "lr_sweep.png", "memory_sweep.png"  # when they ran

def mean_curve(runs, key):
    """(epochs, mean, std) of history[key] up to the last epoch every run reached (--patience stops some)."""
    values = list(zip(*(r["history"][key] for r in runs)))
    return (list(range(1, len(values) + 1)), [statistics.fmean(v) for v in values],
            [statistics.stdev(v) if len(v) > 1 else math.nan for v in values])


def ci_half(stats):
    return 0.0 if stats["ci95"] is None else stats["ci95"][1] - stats["mean"]


def titled(view, title, sep="\n"):
    """A figure's title, led by the quick-run warning when there is one, with the settings changed from main.py's."""
    changed = changed_settings(view["results"]["config"])
    title += f"\n(settings other than the defaults: {changed})" if changed else ""
    return f"{view['quick']}{sep}{title}" if view["quick"] else title


ACC_MIN_SPAN = 1.0  # points: a curve's accuracy axis is at least this tall, so 2 images in 5,000 look small


def style_axes(ax, epochs=True):
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator
    if epochs:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even just one
    if "accuracy" in ax.get_ylabel():
        low, high = ax.get_ylim()
        if high - low < ACC_MIN_SPAN:
            middle = min(100 - ACC_MIN_SPAN / 2, (low + high) / 2)
            ax.set_ylim(middle - ACC_MIN_SPAN / 2, middle + ACC_MIN_SPAN / 2)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f" if ax.get_ylim()[1] - ax.get_ylim()[0] > 2 else "%.2f"))


def draw_curve(ax, view, method, key, **style):
    """A method's mean curve over its seeds, with a band of one standard deviation."""
    epochs, mean, std = mean_curve(ok_runs(view["runs"], method), key)
    line, = ax.plot(epochs, mean, **style)
    if view["n_seeds"] > 1:
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, lw=0)


def plot_curves(plt, view, key):
    ylabel, title = {"train_loss": ("training loss (cross-entropy, log scale)", "Training loss per epoch"),
                     "val_acc": ("validation accuracy (%)", "Validation accuracy per epoch")}[key]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for method in view["trained"]:
        draw_curve(ax, view, method, key, marker="o", color=row(method).color, label=label(method, view["task"]))
    if key == "train_loss":
        ax.set_yscale("log")
    where = "on MNIST too" if view["task"] == "mnist" else f"on {view['task']}"
    ax.set(xlabel="epoch (of each method's own run)", ylabel=ylabel,
           title=titled(view, f"{title} ({view['spread']})\nBase from scratch on MNIST; the others from it, {where}"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never over a curve
    style_axes(ax)
    return fig


def draw_test_accuracy(ax, view):
    summary = view["summary"]
    # on a shifted task the base's own accuracy is on MNIST, another test set: named in the title, not drawn
    shown = [m for m in view["trained"] if not (m == "base" and view["task"] != "mnist")]
    for i, method in enumerate(shown):
        stats = summary[method]["test_acc"]
        ax.errorbar([i], [stats["mean"]], yerr=None if stats["ci95"] is None else [[ci_half(stats)]],
                    fmt="o", ms=8, capsize=6, color=row(method).color)
        ax.annotate(f"{stats['mean']:.2f}", (i, stats["mean"]), xytext=(10, -4), textcoords="offset points")
    ax.set_xticks(range(len(shown)), [label(m, view["task"]).replace(" (", "\n(") for m in shown])
    ax.set_xlim(-0.5, len(shown) - 0.3)
    whiskers = f"mean of {view['n_seeds']} seeds, 95 % CI" if view["n_seeds"] > 1 else "1 seed, no interval"
    lines = [f"Test accuracy, {view['results']['config']['test_size']:,} images", f"({whiskers}; axis zoomed)"]
    if "base_on_task" in summary:
        lines += [f"Base: MNIST {fmt_stat(summary['base']['test_acc'])} %,",
                  f"{view['task']} before fine-tuning {fmt_stat(summary['base_on_task']['test_acc'])} %"]
    ax.set(ylabel="test accuracy (%), axis zoomed", title="\n".join(lines))
    ax.grid(alpha=0.3, axis="y")
    style_axes(ax, epochs=False)


MEMORY_HATCHES = {"frozen_weights": None, "trainable_weights": "xx", "gradients": "//", "optimizer": "..",
                  "activations": None}  # a part's look in the stacked bars; the kept activations drawn pale


def draw_memory(plt, ax, view):
    """Training memory by accounting, stacked in its parts, a bar per method; the measured peak beside it."""
    trained, summary = view["trained"], view["summary"]
    bottom = [0.0] * len(trained)
    for key, what in MEMORY_PARTS:
        mib = [summary[m]["memory"][key] / 2**20 for m in trained]
        ax.bar(range(len(trained)), mib, bottom=bottom, color=[row(m).color for m in trained], edgecolor="black",
               hatch=MEMORY_HATCHES[key], alpha=0.35 if key == "activations" else 0.9, width=0.6)
        bottom = [b + v for b, v in zip(bottom, mib)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.1f}", (i, total), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    peaks = [summary[m]["peak_bytes"] for m in trained]
    legend = [plt.Rectangle((0, 0), 1, 1, facecolor="white" if MEMORY_HATCHES[key] else
                            ("whitesmoke" if key == "activations" else "gray"), edgecolor="black",
                            hatch=MEMORY_HATCHES[key], label=what) for key, what in MEMORY_PARTS]
    if all(peaks):
        what = f"measured peak ({PEAK_HOW[view['results']['environment']['device']]})"
        ax.bar([i + 0.38 for i in range(len(trained))], [p["mean"] / 2**20 for p in peaks], width=0.16,
               color="black", label=what)
        legend.append(plt.Rectangle((0, 0), 1, 1, color="black", label=what))
    ax.set_xticks(range(len(trained)), [display(m) for m in trained])
    ax.set_ylim(0, 1.45 * max(bottom + [p["mean"] / 2**20 for p in peaks if p]))  # room for the legend
    ax.set(ylabel="MiB", title=f"Training memory by accounting, one measured step at batch "
                               f"{view['results']['config']['batch_size']}\n(weights as stored, gradients, Adam; pale: "
                               f"what autograd keeps for backward{'; black: the measured peak' if all(peaks) else ''})")
    ax.legend(handles=legend, fontsize=8, loc="upper left", ncol=3)


def draw_paired(ax, view, ref, names=True):
    """A forest of paired differences to `ref`, filled where a primary contrast survives Holm."""
    shown = [m for m in view["trained"] if m not in ("base", ref)]
    holm = {(c["method"], c["ref"]): c["p_holm"] < 0.05 for c in view["results"]["contrasts"]}
    diffs = {m: d for m in shown if (d := view["summary"][m]["vs"].get(ref))}
    reach = max((max(map(abs, d["ci95"] or [d["mean"]])) for m, d in diffs.items() if adapter_class(m)), default=0)
    for y, method in enumerate(shown):
        if not (stats := diffs.get(method)):
            continue
        if reach and abs(stats["mean"]) > 5 * reach:
            ax.annotate(f"{fmt_ci(stats, signed=True)}, off the axis", (0.02 if stats["mean"] < 0 else 0.98, y),
                        xycoords=("axes fraction", "data"), ha="left" if stats["mean"] < 0 else "right",
                        va="center", fontsize=7, color=row(method).color)
            continue
        beyond = holm.get((method, ref)) or holm.get((ref, method))
        ax.errorbar([stats["mean"]], [y], xerr=None if stats["ci95"] is None else [ci_half(stats)],
                    fmt=row(method).marker, ms=7, capsize=4, color=row(method).color, mfc=None if beyond else "white")
        ax.annotate(f"{stats['mean']:+.2f}", (stats["mean"], y), xytext=(0, 7), textcoords="offset points",
                    ha="center", fontsize=7)
    ax.axvline(0, color=row(ref).color, ls="--")
    ax.set_yticks(range(len(shown)), [display(m).replace(" (", "\n(") for m in shown] if names else [])
    ax.set_ylim(max(len(shown), 1) - 0.5, -0.5)
    noises = {d["noise"] for d in diffs.values() if d["ci95"]}
    interval = f"95 % CI: {' / '.join(sorted(noises))} noise" if noises else "1 seed, no interval"
    ax.set(xlabel="points", title=f"Test accuracy minus {display(ref)}'s, seed by seed\n(paired; {interval};\n"
                                  f"filled: a primary contrast beyond noise after Holm)")
    ax.grid(alpha=0.3, axis="x")


def plot_comparison(plt, view):
    """Test accuracy, paired differences to full FT and LoRA, training memory, file size."""
    summary, trained, results = view["summary"], view["trained"], view["results"]
    fig = plt.figure(figsize=(18, 10.5), layout="constrained")  # tight_layout cannot fit five panels' labels
    top, bottom = fig.subfigures(2, 1)
    by_name = [top.add_subplot(1, 3, 1), bottom.add_subplot(1, 3, (1, 2)), bottom.add_subplot(1, 3, 3)]
    ax_accuracy, ax_memory, ax_file = by_name  # the panels with a method per x tick
    draw_test_accuracy(ax_accuracy, view)
    for column, ref in ((2, "full"), (3, "lora")):
        if ref in trained:
            draw_paired(top.add_subplot(1, 3, column), view, ref)
    draw_memory(plt, ax_memory, view)
    ax_file.bar_label(ax_file.bar([display(m) for m in trained],
                                  [summary[m]["file_bytes"]["mean"] / 2**10 for m in trained],
                                  color=[row(m).color for m in trained]), fmt="%.0f")
    ax_file.set(ylabel="KiB", title="Saved file:\nthe whole model (no adapter) or the adapter only")
    for ax in by_name:  # seven names side by side run into each other: slanted
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    fig.suptitle(titled(view, f"Test accuracy, memory and file size; fine-tuned on {view['task']} "
                              f"({results['environment']['device_name']})", sep=": "))
    return fig


def plot_rank_sweep(plt, view):
    """Test accuracy against stored parameters across ranks; paired differences per rank."""
    sweep, summary, n_seeds, config = view["results"]["rank_sweep"], view["summary"], view["n_seeds"], view[
        "results"]["config"]
    if not sweep:
        return None
    fig, (ax, ax_full, ax_lora) = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    for k, (method, points) in enumerate(sweep.items()):
        # LoRA and QLoRA store the same parameters, so their points would share an x: each method drawn 3 % aside
        dodge = 1.03 ** (k - (len(sweep) - 1) / 2)
        style = dict(marker=row(method).marker, mfc="none", capsize=3, color=row(method).color)
        ax.errorbar([p["stored_params"] * dodge for p in points], [p["test_acc"]["mean"] for p in points],
                    yerr=[ci_half(p["test_acc"]) for p in points] if n_seeds > 1 else None, **style,
                    label=display(method) + " (lr " + ", ".join(f"{p['lr']:g}" for p in points) + ")")
        for panel, key in ((ax_full, "vs_full"), (ax_lora, "vs_lora")):
            shown = [p for p in points if p.get(key)]
            if shown:
                panel.errorbar([p["rank"] * dodge for p in shown], [p[key]["mean"] for p in shown],
                               yerr=[ci_half(p[key]) if p[key]["ci95"] else 0 for p in shown], **style,
                               label=display(method))
    for p in next(iter(sweep.values())):  # the ranks, once, along the bottom
        ax.annotate(f"r={p['rank']}", (p["stored_params"], 0), xycoords=("data", "axes fraction"),
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8, color="dimgray")
    if summary.get("full", {}).get("status") == "ok":
        full = summary["full"]
        ax.errorbar([full["stored_params"]["mean"]], [full["test_acc"]["mean"]],
                    yerr=[ci_half(full["test_acc"])] if n_seeds > 1 else None,
                    marker=row("full").marker, ms=12, capsize=3, ls="none", color=row("full").color,
                    label=f"{display('full')} (lr {full['lr']:g})")
    ax.set_xscale("log")
    rates = ("each rank's rate chosen on its own grid" if view["results"].get("sweep_rates") else
             f"every rank at the rate chosen at r = {config['rank']}")
    ax.set(xlabel="stored parameters: the saved adapter and head (log scale; methods drawn a few % apart)",
           ylabel="test accuracy (%), axis zoomed",
           title=f"Accuracy vs stored parameters ({f'mean of {n_seeds} seeds, 95 % CI' if n_seeds > 1 else '1 seed'})")
    ranks = sorted({p["rank"] for points in sweep.values() for p in points})
    for panel, ref in ((ax_full, "full"), (ax_lora, "lora")):
        panel.axhline(0, color=row(ref).color, ls="--")
        panel.set_xscale("log", base=2)
        panel.set_xticks(ranks, [str(r) for r in ranks])
        panel.set(xlabel="rank r", ylabel="points",
                  title=f"Minus {display(ref)}{' at the same rank' if ref == 'lora' else ''}, paired seed by seed\n"
                        f"(95 % CI: seed and test-set noise)")
        panel.grid(alpha=0.3, which="both")
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    style_axes(ax, epochs=False)
    fig.suptitle(titled(view, f"Rank sweep on {view['task']}: {rates}, update scaled by {scale_formula(config)}",
                        sep=": "))
    fig.tight_layout()
    return fig


def plot_lr_sweep(plt, view):
    """Validation accuracy against the rate per method, the chosen rate ringed, zoomed."""
    config, chosen = view["results"]["config"], view["results"]["learning_rates"]
    grid = [r for r in view["results"]["lr_grid"] if r["rank"] == run_rank(r["method"], config["rank"])]
    if not grid:
        return None
    fig, ax = plt.subplots(figsize=(11, 5.8))
    methods = list(dict.fromkeys(r["method"] for r in grid))
    ok_acc = [r["val_acc"] for r in grid if r["status"] == "ok"]
    picked = [r["val_acc"] for r in grid if r["status"] == "ok" and r["method"] != "head"  # head only: far below
              and chosen.get(r["method"], {}).get("lr") == r["lr"]] or ok_acc
    floor = min(picked) - 1.5
    for k, method in enumerate(methods):
        mine = sorted((r for r in grid if r["method"] == method), key=lambda r: r["lr"])
        ok = [r for r in mine if r["status"] == "ok"]
        failed = [f"{r['lr']:g}" for r in mine if r["status"] not in FINISHED]
        color, marker, dodge = row(method).color, row(method).marker, 1.04 ** (k - (len(methods) - 1) / 2)
        ax.plot([r["lr"] * dodge for r in ok], [r["val_acc"] for r in ok], color=color, marker=marker, ms=5,
                label=display(method) + (f" (failed at lr {', '.join(failed)})" if failed else ""))
        for r in (r for r in ok if r["extension"]):
            ax.plot([r["lr"] * dodge], [r["val_acc"]], ls="none", marker=marker, ms=5, mfc="white", color=color)
        for r in (r for r in mine if r["status"] in FINISHED and r["val_acc"] < floor):  # its foot, and its value
            ax.plot([r["lr"] * dodge], [floor], ls="none", marker="v" if r["status"] == "ok" else "x", ms=8,
                    color=color, clip_on=False)
            ax.annotate(f"{r['val_acc']:.1f}", (r["lr"] * dodge, floor), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=7, color=color)
        if best := [r for r in ok if chosen.get(method, {}).get("lr") == r["lr"]]:
            ax.plot([best[0]["lr"] * dodge], [max(best[0]["val_acc"], floor)], marker=marker, ms=15, mfc="none",
                    mew=1.5, color=color, clip_on=False)
    ax.set_ylim(floor, max(ok_acc, default=floor + 1) + 0.3)
    for marker, ms, mfc, what in (("o", 15, "none", "chosen rate (the method's own mark, large)"),
                                  ("o", 5, "white", "extension of the grid"),
                                  ("v", 8, None, "below the zoomed axis (its value above the mark)"),
                                  ("x", 8, None, "unstable: collapsed after learning (its value above)")):
        ax.plot([], [], marker=marker, ms=ms, mfc=mfc, ls="none", color="black", label=what)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="validation accuracy at the kept epoch (%), axis zoomed",
           title=titled(view, f"Learning-rate grid on {view['task']}, seed {view['results']['seeds'][0]}, main "
                              f"rank, validation only\nchosen by {SELECTION}; methods drawn a few % apart"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    style_axes(ax, epochs=False)
    return fig


def plot_memory_sweep(plt, view):
    """Each column over full FT against the batch, a panel per width, by accounting and measured; recomputing dashed."""
    full = display("full")  # every line a ratio to its column
    rows = [(key, points) for key in ("total", "peak") if (points := sweep_points(view["results"], key))
            and any(full in totals for totals in points.values())]
    if not rows:
        return None
    widths = list(dict.fromkeys(width for width, _ in rows[0][1]))
    fig, axes = plt.subplots(len(rows), len(widths), figsize=(4.2 * len(widths), 3.8 * len(rows)), squeeze=False,
                             sharex=True)
    for (key, points), panels in zip(rows, axes):
        for ax, width in zip(panels, widths):
            mine = {batch: totals for (w, batch), totals in points.items() if w == width}
            for r in {sweep_name(r): r for r in view["results"]["memory_sweep"] if r["method"] != "full"}.values():
                ratio = [(b, t[sweep_name(r)] / t[full]) for b, t in mine.items() if {full, sweep_name(r)} <= set(t)]
                ax.plot([b for b, _ in ratio], [q for _, q in ratio], marker=row(r["method"]).marker,
                        color=row(r["method"]).color, ls="--" if r.get("recompute") else "-", label=sweep_name(r))
            ax.axhline(1, color=row("full").color, ls=":", label=f"{display('full')} (1x)")
            ax.set(xscale="log", yscale="log", title=f"width {width} ({count_parameters(CNN(width))[1]:,} weights)",
                   ylabel=None if width != widths[0] else "over full FT, by accounting" if key == "total"
                   else f"over full FT, measured ({PEAK_HOW[view['results']['environment']['device']]})")
            ax.set_xticks(list(mine), [str(b) for b in mine])
            ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("batch size")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(titled(view, "Training memory over full fine-tuning's, one measured step per point: below the "
                              "dotted line an adapter trains in less", sep=": "), fontsize=10)
    return fig


def draw_figures(results):
    """(file name, figure) of every figure what ran calls for, drawn from results alone (--replot redraws them)."""
    import matplotlib
    matplotlib.use("Agg")  # to files, never to a window
    import matplotlib.pyplot as plt
    summary = results["summary"]
    trained = [m for m, row in summary.items() if row["status"] == "ok" and m != "base_on_task"]
    n_seeds = seeds_finished(summary)
    view = {"results": results, "runs": main_runs(results), "summary": summary, "trained": trained,
            "task": results["config"]["task"], "n_seeds": n_seeds,
            "spread": f"mean of {n_seeds} seeds, band: +-1 std" if n_seeds > 1 else "1 seed",
            "quick": "QUICK RUN (smoke test, not results)" if results["config"].get("quick") else ""}
    figures = {PLOT_FILES[0]: lambda: plot_curves(plt, view, "train_loss"),
               PLOT_FILES[1]: lambda: plot_curves(plt, view, "val_acc"),
               PLOT_FILES[2]: lambda: plot_comparison(plt, view),
               SWEEP_PLOT: lambda: plot_rank_sweep(plt, view),
               LR_PLOT: lambda: plot_lr_sweep(plt, view)} if trained else {}
    if results.get("memory_sweep"):  # a sweep trains nothing
        figures[MEMORY_PLOT] = lambda: plot_memory_sweep(plt, view)
    for name, draw in figures.items():
        if (fig := draw()) is not None:
            try:
                yield name, fig
            finally:
                plt.close(fig)


def plot_results(results, out_dir):
    written = []
    for name, fig in draw_figures(results):
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        write_atomic(Path(out_dir) / name, fig)
        written.append(name)
    return written


# ===== The runs: each method built, trained, tested once and saved; the learning-rate grid and the budget check
RESULTS_FORMAT = 2  # results.json's layout: --resume reads only its own (2: training memory in parts)


def record_key(kind, record):
    """A record's one key: (list, method, seed, rank, its rate in the grid or budget in the check)."""
    extra = record["lr"] if kind == "lr_grid" else record["epochs"] if kind == "budget_check" else None
    return "runs" if kind == "other_runs" else kind, record["method"], record["seed"], record["rank"], extra


def run_label(args, record):
    """What tells a run from its method's others: rank, seed, grid rate, budget."""
    return ((f" r={record['rank']}" if record["rank"] not in (None, args.rank) else "")
            + (f" (seed {record['seed']})" if args.seeds > 1 else "")
            + (f" at lr {record['lr']:g} (learning-rate grid)" if "extension" in record else "")
            + (f" with {record['epochs']} epochs (budget check)" if "epochs" in record else ""))


class Run:
    """What the runs of one experiment share: settings, device, data, results, bases, --resume's records."""

    def __init__(self, args, device, splits, results, earlier):
        self.args, self.device, self.splits, self.results, self.earlier = args, device, splits, results, earlier
        self.out, self.bases = Path(args.out_dir), {}  # seed -> its trained base CNN, copied by every method

    def base(self, seed):
        """The trained base of `seed`: trained in this run, or loaded from its saved file (--resume)."""
        if seed not in self.bases:
            self.bases[seed] = load_plain(saved_model_file(self.out, "base", seed), self.device)
        return self.bases[seed]

    def save(self):
        """results.json and results.md as they stand, with the earlier run's records not reached yet (--resume)."""
        written = {record_key(kind, r) for kind in RECORD_KINDS for r in self.results[kind]}
        waiting = [(key[0], r) for key, r in self.earlier.items() if key not in written]
        save_results(self.results | {kind: self.results[kind] + [r for k, r in waiting if k == kind]
                                     for kind in ("runs", "lr_grid", "budget_check")}, self.out)

    def kept(self, kind, record):
        """The earlier run's record of what `record` (method, seed, rank, rate or budget) names, or None."""
        found = self.earlier.get(record_key(kind, record))
        if found:
            print(f"{display(record['method'])}{run_label(self.args, record)}: finished in a previous run "
                  f"(results.json), kept.")
        return found


def stability(fitted):
    """{"status": "ok"}, or "unstable" for a run that collapsed to chance after learning."""
    if not fitted["collapsed"]:
        return {"status": "ok"}
    epoch, before = fitted["collapsed"]
    return {"status": "unstable", "reason": f"collapsed to {fitted['history']['val_acc'][epoch - 1]:.2f} % validation "
                                            f"accuracy at epoch {epoch}, after {before:.2f} %"}


def report_method(r, batch_size, device):
    """A finished run in the original README's words, each figure saying what it measures."""
    mib = {part: fmt_mib(b) for part, b in r["memory"].items()}
    memory = (f"{fmt_mib(r['peak_bytes'])} MiB measured ({PEAK_HOW[device.type]}, one step at batch {batch_size}); "
              f"by accounting {mib['total']}: weights {mib['frozen_weights']} frozen + {mib['trainable_weights']} "
              f"trainable, gradients {mib['gradients']}, optimizer {mib['optimizer']}, kept for backward "
              f"{mib['activations']}")
    print(f"Total Training Time: {r['train_time_s'] / 60:.2f} min ({r['train_time_s']:.1f} s, {r['epochs_run']} "
          f"epochs)\nMax memory allocated: {memory}\nTrainable parameters: {r['trainable_params']:,} of "
          f"{r['total_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f} %)")
    if "task_test_acc" in r:
        print(f"On the fine-tuning task, before any fine-tuning: {r['task_test_acc']:.2f}% test accuracy")


def divergence_advice(key, lr, args, too_slow=False):
    """What to change after a failed run: rate, budget, or alpha."""
    method, _, rank = key
    if too_slow:
        return f"raise --lr (now {lr:g}) or the epoch budget (--{'epochs' if method == 'base' else 'finetune-epochs'})"
    advice = f"lower --lr (now {lr:g})"
    if adapter_class(method) and args.alpha > SETTINGS["alpha"][0]:
        scale = update_scale(args.alpha, rank, args.scaling == "rslora")
        advice += f" or --alpha (now {args.alpha:g}: every update is scaled by {scale:g})"
    return advice


def finish_run(ctx, record, model):
    """What a tested run adds: its class's record, the merge gap, its saved model, PEFT's accuracy."""
    method, seed, rank, args = record["method"], record["seed"], record["rank"], ctx.args
    if method == "base" and args.task != "mnist":  # where the fine-tuning starts from, on the shifted task
        record["task_test_loss"], record["task_test_acc"] = evaluate(model, *ctx.splits[args.task]["test"])
    cls, path = adapter_class(method), saved_model_file(ctx.out, method, seed, rank)
    if cls:
        record |= cls.record(adapter_layers(model))
        record["merge_gap"] = merge_gap(model, ctx.splits[args.task]["test"][0][:1000])
        record["file_bytes"] = (save_adapter(model, method, rank, args, path) / ADAPTER_WEIGHTS).stat().st_size
    else:  # saved at once: the base is what adapter-only runs and --resume start from
        write_atomic(path, model.state_dict())
        record["file_bytes"] = path.stat().st_size
    record["file_sha256"] = file_digest(path)  # --resume trusts the saved model only while this matches
    base_file = saved_model_file(ctx.out, "base", seed)
    record["full_model_file_bytes"] = base_file.stat().st_size
    if cls and cls.peft_loads_as:
        in_peft = load_adapter(base_file, path, ctx.device, method=cls.peft_loads_as)
        record["test_acc_in_peft"] = evaluate(in_peft, *ctx.splits[args.task]["test"])[1]
        record["test_right_in_peft"] = right_images(in_peft, *ctx.splits[args.task]["test"])


def run_method(ctx, record, trained=None):
    """One run as `record` names it: built and trained (or `trained`), judged on validation or tested once and saved."""
    args, (method, seed, rank, lr) = ctx.args, (record[k] for k in ("method", "seed", "rank", "lr"))
    name, data = display(method) + run_label(args, record), ctx.splits["mnist" if method == "base" else args.task]
    validation_only, started = "extension" in record or "epochs" in record, time.perf_counter()
    load, cpu = [os.getloadavg()[0]], time.process_time()  # the machine's load: are times comparable?

    def stopped(status, reason):  # recorded with the time it took to stop
        return record | {"status": status, "reason": reason, "train_time_s": time.perf_counter() - started}, None
    try:
        if trained is None:
            torch.manual_seed(seed)  # within a seed: the same adapter A for every method
            model = (CNN(args.width).to(ctx.device) if method == "base"
                     else finetuning_copy(ctx.base(seed), method, rank, args)).to(memory_format=torch.channels_last)
            budget = Budget(epoch_budget(vars(args), method, record.get("epochs")), args.batch_size, args.patience)
            watched = [p for layer in (adapter_layers(model).values() if adapter_class(method) else [model])
                       for p in trainable_parameters(layer).values()]  # an adapter's own tensors, else the model's
            start = [p.detach().clone() for p in watched]
            trained = model, train(model, data, lr, budget, seed)
            if all(torch.equal(p, p0) for p, p0 in zip(watched, start)):
                return stopped("failed", f"its {'adapters' if adapter_class(method) else 'weights'} never moved "
                                         f"from their start: every update vanished")
        model, fitted = trained
        record |= {**stability(fitted), "val_right": right_images(model, *data["val"]),  # pairs runs image by image
                   "cpu_time_s": time.process_time() - cpu, "load": load + [os.getloadavg()[0]]}
        if validation_only:
            kept = fitted["best_epoch"] - 1
            record |= {"val_acc": fitted["history"]["val_acc"][kept], "val_loss": fitted["history"]["val_loss"][kept],
                       **{k: fitted[k] for k in ("epochs_run", "best_epoch", "train_time_s", "history")}}
            print(f"Best validation accuracy {record['val_acc']:.2f}% (epoch {record['best_epoch']})")
        else:
            record |= measure(model, fitted, *evaluate(model, *data["test"]))  # the test set, once per run
            record["test_right"] = right_images(model, *data["test"])  # test noise in the paired intervals
            finish_run(ctx, record, model)
            report_method(record, args.batch_size, ctx.device)
        if record["status"] == "unstable":
            print(f"{name} is unstable: {record['reason']}; its best epoch is kept but not counted"
                  + (" and its rate not chosen." if validation_only else ". Going on with the other methods."))
        return record, trained
    except BitsAndBytesUnavailable as e:
        print(f"{name} skipped: {e}")
        return stopped("skipped", str(e))
    except Diverged as e:
        print(f"{name} failed: {e}; {divergence_advice((method, seed, rank), lr, args, e.too_slow)}. Going on with "
              f"the other methods.")
        return stopped("failed", str(e))
    except torch.cuda.OutOfMemoryError:
        print(f"{name} ran out of CUDA memory: try a smaller --batch-size.")
        return stopped("failed", "CUDA out of memory")


MAX_EXTENSIONS = 3  # steps a grid may grow past either end while its best rate sits there


def next_rate(grid, best, original):
    """The rate one step past the grid's end where its best sits (the original grid's log spacing), or None."""
    step = 10 ** (math.log10(max(original) / min(original)) / (len(original) - 1)) if len(original) > 1 else 3.0
    for end, start, factor in ((min(grid), min(original), 1 / step), (max(grid), max(original), step)):
        grown = sum(r < start if factor < 1 else r > start for r in grid)
        beyond = float(f"{start * factor ** (grown + 1):.0e}")
        if best == end and grown < MAX_EXTENSIONS and beyond not in grid and beyond <= MAX_RATE:
            return beyond
    return None


def validation_run(ctx, kind, record):
    """A run of the rate grid or the budget check, kept from an earlier run or run here, and saved."""
    kept, trained = ctx.kept(kind, record), None
    if not kept:
        what = (f"at lr {record['lr']:g}" if kind == "lr_grid" else
                f"at lr {record['lr']:g} for {record['epochs']} epochs")
        print(f"{'Learning-rate grid' if kind == 'lr_grid' else 'Budget check'}: {display(record['method'])} {what}, "
              f"seed {record['seed']}, judged on validation...")
        kept, trained = run_method(ctx, record)
    ctx.results[kind].append(kept)
    ctx.save()
    return kept, trained


def choose_rate(ctx, method, rank):
    """(rate, its grid run's (model, fit)): with --lrs the first seed's best stable rate by the grid; else the row's."""
    args, results = ctx.args, ctx.results
    if not args.lrs or method == "base":  # the base trains from scratch at its own rate: no grid
        table = "BASE" if method == "base" else "METHODS"
        results["learning_rates"][method] = {"lr": args.lr or row(method).lr, "chosen_by": "--lr" if args.lr else table}
        return results["learning_rates"][method]["lr"], None
    grid, trained, records = list(args.lrs), {}, {}
    while True:
        for lr in grid:
            if lr not in records:
                records[lr], trained[lr] = validation_run(ctx, "lr_grid", {
                    "method": method, "seed": args.seed, "rank": rank, "lr": lr, "extension": lr not in args.lrs})
        stable = sorted((r for r in records.values() if r["status"] == "ok"), key=lambda r: r["lr"])
        if not stable:
            return None, None
        ranked = sorted(stable, key=lambda r: selection_key(r["val_acc"], r["val_loss"]), reverse=True)  # stable sort
        beyond = next_rate(grid, ranked[0]["lr"], args.lrs)
        if beyond is None:
            break
        grid.append(beyond)
    best, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    chosen = {"lr": best["lr"], "chosen_by": "validation grid", "grid": sorted(grid),
              "extended": sorted(set(grid) - set(args.lrs)), "runner_up": runner_up and runner_up["lr"]}
    if runner_up:
        n = len(ctx.splits[args.task]["val"][1])
        chosen["margin_images"], chosen["margin_se"] = paired_lead(best["val_right"], runner_up["val_right"], n)
    sweep = "" if rank == run_rank(method, args.rank) else f" r={rank}"
    where = results["sweep_rates"].setdefault(method, {}) if sweep else results["learning_rates"]
    where[str(rank) if sweep else method] = chosen  # a rank of the sweep: its own grid's (--grid-per-rank)
    print(f"{display(method)}{sweep}: lr {best['lr']:g} chosen ({best['val_acc']:.2f}% validation accuracy"
          + (f"; {chosen['margin_images']:+d} ± {chosen['margin_se']:.1f} images over lr {runner_up['lr']:g})."
             if runner_up else ")."))
    return best["lr"], trained.get(best["lr"])


def comparison_run(ctx, key, rates):
    """One run of the plan: kept from an earlier run, or run at its chosen rate, and saved."""
    (method, seed, rank), args = key, ctx.args
    rate_rank = rank if args.grid_per_rank else run_rank(method, args.rank)  # whose grid sets the rate
    if (method, rate_rank) not in rates:  # the first seed's base is there: a grid can run on it
        rates[method, rate_rank] = choose_rate(ctx, method, rate_rank)
    (lr, grid_trained), record = rates[method, rate_rank], {"method": method, "seed": seed, "rank": rank}
    if not (kept := ctx.kept("runs", record)):
        if lr is None:
            kept = record | {"status": "failed", "reason": "every rate of the --lrs grid failed", "train_time_s": 0.0}
        else:
            trains = {"all": "every parameter of", "head": "only the classifier head of"}.get(row(method).trains)
            doing = ("Training the base model" if method == "base" else
                     f"Fine-tuning {trains} the base model ({display(method)})" if trains else
                     f"Fine-tuning the base model with {display(method)}")
            reuse = grid_trained if (seed, rank) == (args.seed, rate_rank) else None
            note = "\n(the grid's run at this rate and seed, not trained again: tested once now, and saved)"
            print(f"{doing}{run_label(args, record)}, lr {lr:g}...{note if reuse else ''}")
            kept, trained = run_method(ctx, record | {"lr": lr, "from_grid": reuse is not None}, trained=reuse)
            if method == "base" and trained:
                ctx.bases[seed] = trained[0]
        print("-------------------------------------")
    ctx.results["runs"].append(kept)
    ctx.save()
    return kept


def budget_check(ctx):
    """The first seed's runs again at every other budget of --budgets, on validation only."""
    args, rates = ctx.args, ctx.results["learning_rates"]
    for method in (m for m in args.methods if m != "base" and rates.get(m, {}).get("lr")):
        for epochs in (e for e in args.budgets if e != epoch_budget(vars(args))):
            validation_run(ctx, "budget_check", {"method": method, "seed": args.seed, "epochs": epochs,
                                                 "rank": run_rank(method, args.rank), "lr": rates[method]["lr"]})


# ===== The output folder: one run at a time, each in a folder of its own; --resume continues one =====
def read_results(path, why):
    """An earlier results.json of this script, checked by drawing everything from it: ConfigError."""
    try:
        results = json.loads(path.read_text())
        if results.get("format") != RESULTS_FORMAT:
            raise ValueError(f"results format {results.get('format')!r}; this version reads {RESULTS_FORMAT}")
        for kind in RECORD_KINDS:  # what --resume looks its records up by
            for r in results[kind]:
                record_key(kind, r), r["status"]
        results_markdown(add_summary(results))
        for _ in draw_figures(results):  # drawn, not written
            pass
    except Exception as e:  # what the readers raise: KeyError, TypeError, ValueError, OSError (a folder there)...
        raise ConfigError(f"{path} is not a results file of this script ({type(e).__name__}: {one_line(e, 100)}): "
                          f"{why}") from None
    return results


def saved_model_problem(out, run):
    """Why a finished run's saved model cannot be trusted (missing, damaged, another method's), or None."""
    path = saved_model_file(out, run["method"], run["seed"], run["rank"])
    if not path.exists():
        return f"its saved model {path} is missing"
    if run["file_sha256"] != file_digest(path):
        return f"{path} is damaged or was written by another run (its checksum is not the one recorded)"
    return None


def earlier_records(out, config, plan):
    """(records --resume trusts from `out`, what this plan will not redo), checksums checked."""
    path = out / "results.json"
    if not path.exists():
        return {}, {}
    earlier = read_results(path, "move it away, or drop --resume")
    if earlier["config"] != config:
        changed = sorted(k for k in set(config) | set(earlier["config"]) if config.get(k) != earlier["config"].get(k))
        raise ConfigError(f"{path} was written with other settings ({', '.join(changed)} differ), so its results "
                          f"would not be comparable: use another --out-dir, the same settings, or drop --resume")
    runs = {}
    for run in earlier["runs"] + earlier["other_runs"]:
        if run["status"] in FINISHED:
            if problem := saved_model_problem(out, run):
                print(f"{display(run['method'])} (seed {run['seed']}): {problem}; not kept, it is trained again if "
                      f"planned.")
            else:
                runs[record_key("runs", run)] = run
    bases = {seed for kind, method, seed, *_ in runs if method == "base"}
    trusted = {key: r for key, r in runs.items() if key[2] in bases}
    trusted |= {record_key(kind, r): r for kind in ("lr_grid", "budget_check") for r in earlier[kind]
                if r["status"] in ("ok", "unstable", "failed") and r["seed"] in bases}
    planned = {method for method, *_ in plan}
    others = {"other_runs": [r for key, r in trusted.items() if key[0] == "runs" and key[1:4] not in plan],
              **{kind: [r for key, r in trusted.items() if key[0] == kind and key[1] not in planned]
                 for kind in ("lr_grid", "budget_check")},
              "learning_rates": {m: rate for m, rate in earlier["learning_rates"].items() if m not in planned},
              "sweep_rates": earlier.get("sweep_rates", {})}  # a rank chosen again here is overwritten
    return trusted, others


def lock_out_dir(out):
    """An exclusive lock on out/.lock while this run writes there (released even by kill -9)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to --out-dir {out} ({e.strerror or e})") from None
    lock = filelock.FileLock(out / ".lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ConfigError(f"another run is writing to {out}: wait for it to finish, or use another --out-dir") from None
    return lock


def free_folder(out):
    """A folder beside `out` that does not exist yet: out-2, out-3, ..."""
    out, k = out.resolve(), 2
    while out.with_name(f"{out.name}-{k}").exists():
        k += 1
    return out.with_name(f"{out.name}-{k}")


def check_out_dir(out, resume=False):
    """A run writes only into a new or empty folder, or with --resume into a run's: else refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file: use --out-dir {free_folder(out)}")
    held = sorted(e.name for e in out.iterdir() if e.name != ".lock") if out.is_dir() else []
    finished = "results.json" in held
    if held and not (resume and finished):
        what = "a run's results" if finished else "other files (" + ", ".join(held[:3]) + ")"
        hint = " (--resume continues that run)" if finished else ""
        raise ConfigError(f"{out} already holds {what}{hint}: a run writes only into a new or empty folder; "
                          f"use --out-dir {free_folder(out)}")


# ===== main(): flags, checks, the experiment =====
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag (or default): one sentence, not argparse's usage text
        raise ConfigError(f"{message.replace('argument ', '', 1)}; see python main.py --help")


def parse_args(argv=None):
    """One flag per SETTINGS entry, defaulting to it; then the flags that steer a run."""
    p = ArgumentParser(description="MNIST CNN fine-tuned with hand-written LoRA, DoRA and QLoRA.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, (default, kind, meaning) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meaning)
        else:
            p.add_argument(flag, type=kind, default=None if default is None else str(default), help=meaning)
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already finished in out-dir/results.json (same settings) whose saved models "
                        "are there and intact; run the rest")
    p.add_argument("--replot", metavar="DIR",
                   help="train nothing: redraw every figure and results.md from DIR/results.json, into DIR (its "
                        "results.json untouched) or a new --out-dir")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TRAIN_SIZE} training / {QUICK_VAL_SIZE} validation / {QUICK_TEST_SIZE} "
                        f"test images, at most {QUICK_MAX_EPOCHS} epochs per method")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(m.strip().lower() for m in args.methods.split(",") if m.strip()))
    args.task = args.task.strip().lower()
    return args


def seeds_of(args):
    return [args.seed + k for k in range(args.seeds)]


def check_args(args):
    """What argparse's types cannot check: one ConfigError sentence before anything runs."""
    unknown = [m for m in args.methods if m != "base" and m not in METHODS]
    if unknown or not args.methods:
        raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(['base', *METHODS])}, comma-separated")
    if "base" in args.methods and args.methods[0] != "base":
        raise ConfigError("base must come first in --methods: the other methods fine-tune the base it trains")
    for method, spec in METHODS.items():  # a variant's settings: only those a run of one method can take
        if bad := sorted(set(spec.settings) - set(ROW_SETTINGS)):
            raise ConfigError(f"METHODS[{method!r}] sets {', '.join(bad)}, which a row cannot change: a row may set "
                              f"{', '.join(ROW_SETTINGS)}")
    by_row = [method_settings(m, args) for m in METHODS]  # a variant's own settings, checked as its flag's
    for flag, value, allowed in (("--task", args.task, TASKS), ("--device", args.device, ("auto", "cpu", "cuda")),
                                 ("--scaling", args.scaling, ("lora", "rslora")),
                                 *(("--bias", v.bias, ("none", "lora_only", "all")) for v in by_row),
                                 *(("--dyn-budget", v.dyn_budget, ("components", "params")) for v in by_row)):
        if value not in allowed:
            raise ConfigError(f"unknown {flag} {value!r}: choose from {', '.join(allowed)}")
    rates = ([("--lr", args.lr)] * (args.lr is not None) + [("--lrs", r) for r in args.lrs]
             + [("BASE.lr" if m == "base" else f"METHODS[{m!r}].lr", r) for m, r in default_rates().items()])
    for name, value in rates:
        if not (isinstance(value, (int, float)) and 0 < value <= MAX_RATE):
            raise ConfigError(f"{name} must be a rate above 0 and at most {MAX_RATE:g} (got {value})")
    if not 0 < args.alpha <= MAX_ALPHA:
        raise ConfigError(f"--alpha must be above 0 and at most {MAX_ALPHA:g} (got {args.alpha})")
    if args.memory_batches and not [m for m in args.methods if m != "base"]:
        raise ConfigError("--memory-batches measures fine-tuning methods: name at least one besides base in "
                          "--methods")
    if args.resume and args.memory_batches:
        raise ConfigError("--memory-batches runs the memory sweep, which trains nothing and takes about a minute: "
                          "drop --resume")
    if not 0 <= args.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1) (got {args.dropout})")
    if args.recompute and args.dropout:
        raise ConfigError("--recompute needs --dropout 0: the pass again in backward would draw another mask")
    for method in filter(adapter_class, METHODS):  # each method's own settings, checked by its class
        adapter_class(method).options(method_settings(method, args))
    limit = max_rank(CNN(args.width), args.train_head)
    for flag, rank in [("--rank", args.rank)] + [("--ranks", r) for r in args.ranks]:
        if not 1 <= rank <= limit:
            raise ConfigError(f"{flag} must be between 1 and {limit}, the smallest min(in, out) of the adapted "
                              f"layers (got {rank})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")


def plan_runs(args):
    plan = [(m, s, run_rank(m, args.rank)) for s in seeds_of(args) for m in args.methods]
    return plan + [(m, s, r) for s in seeds_of(args) for m in args.methods if adapter_class(m)
                   for r in args.ranks if r != args.rank]


def environment(device, methods):
    bnb = "not used"
    if any(getattr(adapter_class(m), "uses_bitsandbytes", False) for m in methods):
        try:  # installed but unusable says so, not the version on disk
            bnb = bitsandbytes() and sys.modules["bitsandbytes"].__version__
        except BitsAndBytesUnavailable:
            bnb = "not usable"
    threads, cpuinfo = torch.get_num_threads(), Path("/proc/cpuinfo")  # Linux names the CPU there, platform not
    cpu = next((line.split(":", 1)[1].strip() for line in (cpuinfo.read_text() if cpuinfo.is_file() else "")
                .splitlines() if line.startswith("model name")), platform.machine())
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU: {cpu}, {threads} thread{'s' if threads > 1 else ''}")
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "bitsandbytes": bnb,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}


def training_device(args):
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def load_splits(args, device):
    tasks = dict.fromkeys(("mnist", args.task))
    sources = dict.fromkeys(TASK_DATASET.get(task, "MNIST") for task in tasks)
    data = {name: load_dataset(args.data_dir, name) for name in sources}
    sizes = (dict(val_size=QUICK_VAL_SIZE, train_size=QUICK_TRAIN_SIZE, test_size=QUICK_TEST_SIZE) if args.quick
             else dict(val_size=VAL_SIZE))
    return {task: make_splits(data[TASK_DATASET.get(task, "MNIST")], device, task, seed=args.seed, **sizes)
            for task in tasks}


def run_config(args, splits=None):
    """What decides the numbers (results.json's "config", equal for --resume)."""
    config = {k: v for k, v in vars(args).items()
              if k not in ("data_dir", "out_dir", "device", "methods", "resume", "seeds", "ranks", "grid_per_rank",
                           "budgets", "replot") + (() if args.memory_batches else ("memory_batches", "memory_widths"))}
    sizes = {f"{split}_size": len(splits["mnist"][split][1]) for split in ("val", "train", "test")} if splits else {}
    variants = {m: spec.settings for m, spec in METHODS.items() if spec.settings}
    return config | dict(learning_rates=default_rates(), variants=variants, quant_blocksize=QUANT_BLOCKSIZE) | sizes


def code_version():
    """The code a run ran: main.py's SHA-256 and the git commit (and whether the file was edited)."""
    here = Path(__file__).resolve()
    version = {"main_py_sha256": file_digest(here), "commit": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(here.parent)]
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            changed = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", here.name], timeout=10).returncode
            version |= {"commit": commit.stdout.strip(), "main_py_edited": changed != 0}
    return version


def new_results(args, config, device):
    return {"format": RESULTS_FORMAT, "memory_accounting": 2, "config": config, "code": code_version(),
            "environment": environment(device, args.methods), "methods": args.methods, "seeds": seeds_of(args),
            "ranks": args.ranks, "learning_rates": {}, "sweep_rates": {}, "memory_sweep": []} | {
                kind: [] for kind in RECORD_KINDS}


def print_summary(results, args):
    for method, row in results["summary"].items():
        shown = (f"{row['status']} ({row['reason']})" if row["status"] != "ok" else f"{fmt_stat(row['test_acc'])}%"
                 + (f" (mean ± std of {row['test_acc']['n']} seeds; 95 % CI {fmt_ci(row['test_acc'])})"
                    if row["test_acc"]["std"] is not None else ""))
        print(f"{label(method, args.task)} Model Test Accuracy: {shown}")
    quick = "QUICK RUN: a smoke test on a subset, not results.\n" if args.quick else ""
    print(f"\n{quick}{comparison_table(results)}\n\n" + "\n".join(who_won(results) + [busy_note(results)]).strip())
    print(f"\nPlots, results.json and results.md (every table) are in\n  {args.out_dir}/")


def draw_finished(results, out, failing=False):
    """The plots of whatever finished; while failing, a failure to draw is only mentioned."""
    add_summary(results)  # runs kept by --resume may have come in since the last save
    if any(r["status"] == "ok" for r in results["runs"]):
        try:
            plot_results(results, out)
        except WriteError as e:
            if not failing:
                raise
            print(f"The plots were not written either: {e}.", file=sys.stderr)


def check_bases(args, plan, earlier):
    have = ({seed for method, seed, _ in plan if method == "base"}
            | {key[2] for key in earlier if key[:2] == ("runs", "base")})
    missing = sorted({seed for method, seed, _ in plan if method != "base"} - have)
    if missing:
        adapters = ", ".join(m for m in args.methods if m != "base")
        raise ConfigError(f"{adapters} fine-tune a trained base model: add base to --methods, or --resume in an "
                          f"out-dir whose results.json holds an intact base of seed(s) {', '.join(map(str, missing))}")


def prepare(args):
    """(the runs' context, the plan), once everything that can stop the run has been checked."""
    out, plan = Path(args.out_dir), plan_runs(args)
    if not args.resume:  # before loading anything; with --resume, once the earlier results are read
        check_bases(args, plan, {})
    device = training_device(args)
    splits = load_splits(args, device)
    config = run_config(args, splits)
    earlier, others = earlier_records(out, config, plan) if args.resume else ({}, {})
    check_bases(args, plan, earlier)
    results = new_results(args, config, device) | others
    print(f"{'QUICK RUN (a smoke test, not results). ' if args.quick else ''}Device: "
          f"{results['environment']['device_name']}\n{config['train_size']:,} training, {config['val_size']:,} "
          f"validation, {config['test_size']:,} test images; fine-tuning on {args.task}; {len(plan)} runs "
          f"({args.seeds} seed(s){f', ranks {args.ranks}' if args.ranks else ''}); settings other than main.py's "
          f"defaults: {changed_settings(config) or 'none'}\nWriting to {out}/")
    return Run(args, device, splits, results, earlier), plan


def run_experiment(args):
    """Every planned run in order, the budget check, the plots, the summary: exit 0, or 1 on a failure."""
    ctx, plan, rates = *prepare(args), {}
    started, trained = time.perf_counter(), 0
    try:
        for k, key in enumerate(plan, 1):
            pace = (time.perf_counter() - started) / max(trained, 1)  # seconds a run trained here took
            left = f", about {pace * (len(plan) - k + 1) / 60:.1f} min left at the pace so far" if trained else ""
            print(f"== Run {k} of {len(plan)}{left} ==")
            record = comparison_run(ctx, key, rates)
            trained += record_key("runs", record) not in ctx.earlier  # kept ones took no time
            if record["method"] == "base" and record["status"] not in FINISHED:
                print(f"error: the base model of seed {record['seed']} failed, so there is nothing to fine-tune.",
                      file=sys.stderr)
                break
        else:
            budget_check(ctx)
    except BaseException:  # interrupted (Ctrl-C) or failed: whatever finished is drawn all the same
        draw_finished(ctx.results, ctx.out, failing=True)
        raise
    draw_finished(ctx.results, ctx.out)
    print_summary(ctx.results, args)
    return 0 if all(r["status"] not in ("failed", "unstable") for r in ctx.results["runs"]) else 1


def run_memory_sweep(args):
    """The memory sweep alone (--memory-batches): one measured step per method, width and batch; no training."""
    out, device = Path(args.out_dir), training_device(args)
    width, batch, free = max(args.memory_widths), max(args.memory_batches), available_memory(device)
    if free is not None and (needed := step_estimate(width, batch)) > free:
        raise ConfigError(f"the sweep's largest point (width {width}, batch {batch}) needs about "
                          f"{needed / 2**30:.1f} GiB by an estimate from the shapes, more than "
                          f"the {free / 2**30:.1f} GiB available on {device.type}: lower --memory-batches or "
                          f"--memory-widths")
    print(f"Memory sweep on {device.type}: widths {args.memory_widths}, batch sizes {args.memory_batches}; one "
          f"measured training step per point, nothing trained. Writing to {out}/")
    results = new_results(args, run_config(args), device)
    results["memory_sweep"] = memory_sweep(args, device)
    save_results(results, out)
    drawn = plot_results(results, out)
    if "full" not in args.methods:
        print("\nNo crossover: full fine-tuning was not measured (add full to --methods).")
    for key, how in (("total", "by accounting"), ("peak", "measured")) if "full" in args.methods else ():
        print(f"\n{crossover_table(results, key)}\n(the largest batch at which each method still trains in less "
              f"memory than full fine-tuning, {how}, by CNN width)")
    print(f"\nresults.md (every point), results.json{''.join(f' and {name}' for name in drawn)} are in\n  {out}/")
    return 0


def replot(args):
    """--replot DIR: figures and results.md redrawn from DIR/results.json, nothing trained."""
    source, out = Path(args.replot), Path(args.out_dir)
    results = read_results(source / "results.json", "--replot DIR needs a folder holding one")
    save_results(results, out, records=out.resolve() != source.resolve())  # DIR's own results.json stays as it is
    print(f"Redrawn from {source / 'results.json'}: {', '.join(plot_results(results, out))} and results.md, in {out}/")
    return 0


def main(argv=None):
    """Exit status: 0 done; 1 a run failed or an output was not written; 2 bad input, before training; 130 Ctrl-C."""
    lock, results, args = None, "results.json", None
    try:
        args = parse_args(argv)
        check_args(args)
        if not args.out_dir:  # a new folder of its own: under runs/, or the folder --replot redraws
            new = Path("runs") / (time.strftime("%Y-%m-%d-%H%M%S") + ("-quick" if args.quick else
                                                                     "-memory" if args.memory_batches else ""))
            args.out_dir = args.replot or str(free_folder(new).relative_to(Path.cwd()) if new.exists() else new)
        out = Path(args.out_dir)
        results = out / "results.json"
        in_place = args.replot and out.resolve() == Path(args.replot).resolve()  # --replot DIR into DIR itself
        if not in_place:
            check_out_dir(out, args.resume)  # before the lock: a folder refused gets no file of ours
        lock = lock_out_dir(out)
        if not in_place:
            check_out_dir(out, args.resume)  # again under the lock: no other run filled it meanwhile
        if args.replot:
            return replot(args)
        return run_memory_sweep(args) if args.memory_batches else run_experiment(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WriteError, ModelFileError) as e:
        print(f"error: {e}. Every run finished before it is kept in {results}: fix the cause and run the same "
              f"command with --resume.", file=sys.stderr)
        return 1
    except OSError as e:  # a file or folder the system will not let this run read or make, named by the system
        print(f"error: cannot use {e.filename or 'a file'} ({e.strerror or e}); every run finished before it is kept "
              f"in {results}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted: the memory sweep writes its results when every point is measured, so nothing was "
              "kept; run it again." if args and args.memory_batches and not args.replot else
              f"\nInterrupted: every run finished before it is kept in {results}; run the same command with "
              f"--resume to continue.", file=sys.stderr)
        return 130
    finally:
        if lock:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
