"""Train a conversion-ready ANN and export it for the toolchain.

    python -m models.train --arch cnn_small --dataset mnist --data ../shared/data/mnist \\
        --act clip --epochs 3 --out out/mnist_cnn

Writes DIR/model.pt (weights and the configuration needed to rebuild the model),
DIR/model.onnx (through `exporters.export_onnx`, with the preprocessing in its metadata)
and DIR/result.json. Data comes only from --data (read with `toolchain.data`); nothing
is downloaded. Runs on CPU or CUDA (bf16/fp16 autocast on CUDA only). For a given seed,
device and thread count the run is deterministic (seeded initialisation, seeded data
order and augmentation, deterministic cuDNN), unless --time-budget picks the number of
epochs from the measured speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.arch import ARCHS, build
from models.layers import ACTIVATIONS, QCFS, ClipReLU, make_act, parameter_groups

CHECKPOINT_FORMAT = "snn-toolchain-model/1"

# per-channel statistics of the training splits, on pixels scaled to [0, 1]
DATASET_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DEFAULT_OPTIMIZER = {"mnist": "adam", "fashion-mnist": "adam", "cifar10": "sgd"}
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
DEFAULT_WEIGHT_DECAY = {"adam": 1e-2, "sgd": 5e-4}  # AdamW's decoupled decay needs a larger value
# Clipped ReLU: measured on two Fashion-MNIST models, ceilings started at 2 ended at 1.5-3.5 and
# converted far better at T <= 8 than ceilings started at 8 (which ended at 6-8); QCFS ceilings get
# a gradient from every activation and train from 8 (the QCFS paper's start).
LAM_INIT = {"clip": 2.0, "qcfs": 8.0, "relu": 8.0}
CEILING_LR = {"adam": 10.0, "sgd": 1.0}  # Adam moves a ceiling by about lr per step: let it move

# Training recipes: defaults for the options left unset. "fast" follows the fast-training results
# on CIFAR-10 (Page 2018, "How to train your ResNet"; Jordan 2024, airbench): large-batch Nesterov
# SGD with a linear warm-up and linear decay to zero, label smoothing 0.2, flip + 2-pixel translate,
# a frozen patch-whitening stem (vgg_fast), channels-last memory on the CPU too. A short schedule
# leaves a QCFS ceiling no time to come down from 8, so both activations start at 2.
RECIPES: dict[str, dict] = {
    "default": {"batch_size": 128, "label_smoothing": 0.0, "schedule": "cosine", "warmup_epochs": 0.0,
                "translate": 4, "whiten": False, "eval_limit": None},
    "fast": {"batch_size": 512, "label_smoothing": 0.2, "schedule": "onecycle", "warmup_epochs": 1.5,
             "translate": 2, "whiten": True, "eval_limit": 2000, "lr": 0.4, "optimizer": "sgd",
             "weight_decay": 5e-4, "lam_init": 2.0},
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
    parser.add_argument("--dataset", required=True, choices=sorted(DATASET_STATS))
    parser.add_argument("--data", required=True, help="dataset folder or file (IDX folder, CIFAR-10 tar.gz folder, .npz)")
    parser.add_argument("--width", type=int, help="base channel count (vgg_small: default 32; vgg_fast: default 48; vgg_air: 64)")
    parser.add_argument(
        "--recipe",
        default="default",
        choices=sorted(RECIPES),
        help="defaults for the options below that are left unset; fast: batch 512, SGD lr 0.4 with linear "
        "warm-up (1.5 epochs) and decay, label smoothing 0.2, 2-pixel translate, frozen patch-whitening stem",
    )
    parser.add_argument("--act", default="clip", choices=ACTIVATIONS)
    parser.add_argument("--levels", type=int, default=8, help="QCFS quantisation levels L (with --act qcfs)")
    parser.add_argument(
        "--lam-init",
        type=float,
        help="initial activation ceiling lambda (default 2 for clip, 8 for qcfs): a ceiling above every "
        "activation gets no gradient and weight decay alone moves it slowly, so a clip ceiling starts tight",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="default 128 (recipe fast: 512)")
    parser.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0; fast: 0.2)")
    parser.add_argument("--schedule", choices=("cosine", "onecycle"), help="learning rate schedule (fast: onecycle)")
    parser.add_argument("--warmup-epochs", type=float, help="onecycle: epochs of linear warm-up (fast: 1.5)")
    parser.add_argument("--translate", type=int, help="CIFAR: random translation by up to N pixels (default 4; fast: 2)")
    parser.add_argument(
        "--whiten",
        action=argparse.BooleanOptionalAction,
        help="initialise the first conv as a frozen patch-whitening filter bank (fast: on)",
    )
    parser.add_argument(
        "--eval-limit", type=int, help="test samples evaluated after each epoch (the last epoch: all; fast: 2000)"
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help="default: adam for (fashion-)mnist, sgd for cifar10")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 adam, 0.05 sgd), cosine decay")
    parser.add_argument(
        "--weight-decay", type=float, help="on weights and activation ceilings (default 5e-4 sgd, 1e-2 adam (AdamW))"
    )
    parser.add_argument(
        "--ceiling-lr-scale", type=float, help="learning-rate factor for the activation ceilings (default 1 sgd, 10 adam)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--limit-train", type=int, help="use only the first N training samples")
    parser.add_argument("--limit-test", type=int, help="evaluate on only the first N test samples")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads for torch")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds for training: after the second epoch (or the first, if it alone nearly fills the budget) "
        "cut --epochs to fit, rescaling the cosine schedule; the epoch count then depends on the machine's speed",
    )
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export (model.pt and result.json only)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUT/train_state.pt (written after every epoch) with the same options; "
        "the result is the uninterrupted run's",
    )
    args = parser.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def keep_freed_memory() -> None:
    """Stop glibc from returning freed tensor memory to the OS after every step. By default each
    large activation buffer is mmap'ed and unmapped again, and the page faults of refilling it cost
    a third of the training time in kernel mode (measured: vgg_fast on one CPU thread, batch 512)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # mallopt parameters from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 34)
    libc.mallopt(m_top_pad, 1 << 28)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return device


class Normalizer:
    """uint8 batches on the device -> normalised float32 batches, with optional CIFAR augmentation."""

    def __init__(self, mean, std, device: torch.device, augment: bool, translate: int = 4):
        self.translate = translate
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.augment = augment

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.augment and generator is not None:
            x = random_crop_flip(x, generator, self.translate)
        return (x.float() / 255.0 - self.mean) / self.std


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop from a zero-padded image and random horizontal flip (random numbers
    drawn on the CPU from `generator`, so runs are reproducible on any device)."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0].view(n, 1) + torch.arange(h, device=x.device).view(1, h)  # (n, h)
    cols = offsets[1].view(n, 1) + torch.arange(w, device=x.device).view(1, w)  # (n, w)
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def lr_at(step: int, total: int, base: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """Cosine decay to 0, or (onecycle) a linear rise over `warmup` steps then a linear fall to 0."""
    if schedule == "onecycle":
        if step < warmup:
            return base * (step + 1) / warmup
        return base * max(0.0, total - step) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def patch_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set `conv` (bias-free, an even number of output channels, stride 1) to the whitening of the
    images' patches: the leading eigenvectors of their covariance, each scaled by 1/sqrt(eigenvalue)
    and taken with both signs so that a ReLU-like activation keeps both halves (as in airbench).
    The filters are then frozen: the stem is a fixed decorrelating transform, which lets a short
    schedule start learning from the first step."""
    k = conv.kernel_size[0]
    pairs = conv.out_channels // 2
    patches = F.unfold(images.double(), k).transpose(1, 2).reshape(-1, images.shape[1] * k * k)
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    top = eigenvalues.flip(0)[:pairs], eigenvectors.flip(1)[:, :pairs].T
    filters = (top[1] / torch.sqrt(top[0] + eps)[:, None]).reshape(pairs, images.shape[1], k, k)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[: 2 * pairs] = torch.cat([filters, -filters]).to(conv.weight.device, conv.weight.dtype)
    conv.weight.requires_grad_(False)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalizer, autocast, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for begin in range(0, len(y), batch):
            with autocast():
                logits = model(norm(x[begin : begin + batch]))
            correct += int((logits.argmax(1) == y[begin : begin + batch]).sum())
    return correct / max(1, len(y))


def ceilings(model: nn.Module) -> list[float]:
    return [round(float(m.lam.detach()), 5) for m in model.modules() if isinstance(m, (ClipReLU, QCFS))]


def _save_atomically(document: dict, path: Path) -> None:
    """torch.save through a temporary file: a kill mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(document, tmp)
    os.replace(tmp, path)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, path: Path, config: dict) -> None:
    _save_atomically({"format": CHECKPOINT_FORMAT, "config": config, "state_dict": _cpu_state(model)}, path)


TRAIN_STATE = "train_state.pt"
# Options that change what is trained: a resumed run must use the ones it started with.
RESUME_KEYS = ("arch", "width", "dataset", "act", "levels", "lam_init", "epochs", "seed", "batch_size", "recipe",
               "label_smoothing", "schedule", "warmup_epochs", "translate", "whiten", "optimizer", "lr",
               "weight_decay", "ceiling_lr_scale", "limit_train", "time_budget")  # fmt: skip


def save_train_state(path: Path, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, progress: dict) -> None:  # fmt: skip
    """Everything the next epoch depends on (weights, momentum, the data-order and augmentation
    generator, the schedule's position), so that `--resume` continues exactly where this run stopped."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "options": {key: getattr(args, key) for key in RESUME_KEYS},
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "progress": progress,
    }
    _save_atomically(state, path)


def load_train_state(path: Path, args: argparse.Namespace) -> dict:
    """The saved state, after checking that it belongs to these options (ValueError names the first that differs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say so in one line
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}); delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a training state written by models.train")
    for key in RESUME_KEYS:
        saved, now = state["options"].get(key), getattr(args, key)
        if saved != now:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: {path} was trained with {option} {saved}, not {now}; pass the same options")
    return state


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by this script: returns (model in eval mode, config)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint written by models.train")
    config = ckpt["config"]
    act = make_act(config["act"], int(config.get("levels") or 8), float(config.get("lam_init", 8.0)))
    model = build(config["arch"], config["in_channels"], config["num_classes"], act, config["input_size"], config.get("width"))
    model.load_state_dict(ckpt["state_dict"])
    if config.get("whiten"):
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.weight.requires_grad_(False)
    return model.eval(), config


def checkpoint_config(args: argparse.Namespace, channels: int, num_classes: int, size: int, levels: int,
                      mean, std) -> dict:  # fmt: skip
    """What `load_checkpoint` needs to rebuild the model, and the preprocessing for the export."""
    return {
        "arch": args.arch,
        "width": args.width,
        "act": args.act,
        "levels": levels,
        "lam_init": args.lam_init,
        "whiten": bool(args.whiten),
        "in_channels": channels,
        "num_classes": num_classes,
        "input_size": size,
        "dataset": args.dataset,
        "preprocess": {"scale": 1 / 255, "mean": list(mean), "std": list(std), "layout": "NCHW"},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from toolchain.data import load_dataset
    from toolchain.errors import ToolchainError

    if not Path(args.data).exists():
        return fail(f"{args.data}: no such data folder or file (pass the {args.dataset} dataset with --data)")
    try:
        device = pick_device(args.device)
    except (ValueError, RuntimeError) as exc:
        return fail(str(exc))
    if args.act == "qcfs" and args.levels < 1:
        return fail("--levels must be >= 1 with --act qcfs")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.set_flush_denormal(True)  # tiny weights/activations must not slow CPU training down

    t0 = time.time()
    try:
        train_set = load_dataset(args.data, "train")
        test_set = load_dataset(args.data, "test")
    except ToolchainError as exc:
        return fail(str(exc))
    train_set = train_set.subset(args.limit_train)
    test_set = test_set.subset(args.limit_test)
    channels, height, width = (int(d) for d in train_set.x.shape[1:])
    if height != width:
        return fail(f"{args.data}: square images expected, got {height}x{width}")
    num_classes = int(max(train_set.y.max(), test_set.y.max())) + 1
    mean, std = DATASET_STATS[args.dataset]
    if len(mean) != channels:
        return fail(f"{args.data}: {channels}-channel images, but {args.dataset} has {len(mean)} channels")
    print(
        f"data: {len(train_set)} train, {len(test_set)} test, {channels}x{height}x{width}, {num_classes} classes "
        f"({time.time() - t0:.1f} s to read)",
        flush=True,
    )

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    levels = args.levels if args.act == "qcfs" else 0
    if args.lam_init is None:
        args.lam_init = LAM_INIT[args.act]
    act = make_act(args.act, args.levels, args.lam_init)
    try:
        model = build(args.arch, channels, num_classes, act, height, args.width).to(device)
    except ValueError as exc:
        return fail(str(exc))
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    if args.whiten:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None or first.bias is not None or first.stride != (1, 1) or first.out_channels < 2:
            return fail(f"--whiten: {args.arch} does not start with a bias-free stride-1 conv of 2 or more channels")
        sample = torch.from_numpy(np.array(train_set.x[:5000], np.uint8)).float() / 255.0
        patch_whitening(first, (sample - mean_t) / std_t)
    # channels-last is faster on CUDA and, measured with oneDNN here, about 10 % faster on the CPU
    fast_layout = device.type == "cuda" or args.recipe == "fast"
    memory_format = torch.channels_last if fast_layout else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    optimizer_name = args.optimizer or DEFAULT_OPTIMIZER[args.dataset]
    base_lr = args.lr if args.lr is not None else DEFAULT_LR[optimizer_name]
    weight_decay = args.weight_decay if args.weight_decay is not None else DEFAULT_WEIGHT_DECAY[optimizer_name]
    ceiling_lr_scale = args.ceiling_lr_scale if args.ceiling_lr_scale is not None else CEILING_LR[optimizer_name]
    groups = parameter_groups(model, weight_decay, ceiling_lr_scale)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=base_lr)

    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

        def autocast():
            return torch.autocast("cuda", dtype=amp_dtype)
    else:
        amp_dtype = None

        def autocast():
            return torch.autocast("cpu", enabled=False)

    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    x_train = torch.from_numpy(np.array(train_set.x, np.uint8)).to(device)
    y_train = torch.from_numpy(train_set.y).to(device)
    x_test = torch.from_numpy(np.array(test_set.x, np.uint8)).to(device)
    y_test = torch.from_numpy(test_set.y).to(device)
    norm = Normalizer(mean, std, device, augment=args.dataset == "cifar10", translate=args.translate)
    eval_limit = min(len(y_test), args.eval_limit or len(y_test))
    generator = torch.Generator().manual_seed(args.seed)

    n = len(train_set)
    steps_per_epoch = math.ceil(n / args.batch_size)
    epochs = args.epochs
    total_steps = epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch) if args.schedule == "onecycle" else 0
    report_every = max(1, steps_per_epoch // 5)
    tty = sys.stderr.isatty()
    print(
        f"train: {args.arch} act={args.act}{f' L={levels}' if levels else ''} on {device} "
        f"({'autocast ' + str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'}), {optimizer_name} "
        f"lr={base_lr:g} ({args.schedule}), batch {args.batch_size}, {epochs} epochs x {steps_per_epoch} steps, "
        f"recipe {args.recipe}, seed {args.seed}",
        flush=True,
    )

    step = 0
    test_acc = 0.0
    train_acc = 0.0
    train_start = time.time()
    epoch = 0
    state_path = Path(args.out) / TRAIN_STATE
    if args.resume and state_path.exists():
        try:
            state = load_train_state(state_path, args)
        except ValueError as exc:
            return fail(str(exc))
        model.load_state_dict(state["model"])  # copies into the parameters: their layout stays
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        progress = state["progress"]
        epoch, step, epochs = progress["epoch"], progress["step"], progress["epochs"]
        # a run killed after its last epoch (in the export) trains nothing more: report that epoch's figures
        train_acc, test_acc = progress.get("train_acc", 0.0), progress.get("test_acc", 0.0)
        total_steps = epochs * steps_per_epoch
        train_start -= progress["seconds"]  # train_seconds and the time estimates count the earlier part
        print(f"resumed from {state_path}: epoch {epoch} of {epochs} done, {progress['seconds']:.0f} s", flush=True)
    elif args.resume:
        print(f"--resume: no {state_path} yet, starting at epoch 1", flush=True)
    while epoch < epochs:
        epoch_start = time.time()
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for index in range(steps_per_epoch):
            batch_idx = order[index * args.batch_size : (index + 1) * args.batch_size]
            xb = norm(x_train[batch_idx], generator).contiguous(memory_format=memory_format)
            yb = y_train[batch_idx]
            lr = lr_at(step, total_steps, base_lr, args.schedule, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with autocast():
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            if not tty and (index + 1) % report_every == 0 and index + 1 < steps_per_epoch:
                elapsed = time.time() - train_start
                left = elapsed / step * (total_steps - step)
                print(
                    f"  epoch {epoch + 1}/{epochs} step {index + 1}/{steps_per_epoch} loss {float(loss.detach()):.4f} "
                    f"lr {lr:.3g}, {step * args.batch_size / elapsed:.0f} img/s, about {left / 60:.0f} min left",
                    flush=True,
                )
            if tty and (index % 20 == 0 or index == steps_per_epoch - 1):
                print(
                    f"\r  epoch {epoch + 1}/{epochs} step {index + 1}/{steps_per_epoch} loss {float(loss):.4f}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if tty:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
        train_acc = float(correct) / n
        epoch_seconds = time.time() - epoch_start
        last = epoch + 1 == epochs
        limit = len(y_test) if last else eval_limit
        test_acc = evaluate(model, x_test[:limit], y_test[:limit], norm, autocast)
        left = (time.time() - train_start) / (epoch + 1) * (epochs - epoch - 1)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {float(loss_sum) / n:.4f} train {100 * train_acc:.2f}% "
            f"test {100 * test_acc:.2f}% ({'all' if limit == len(y_test) else 'first'} {limit}) lr {lr:.3g} "
            f"({epoch_seconds:.1f} s{f', about {left / 60:.0f} min left' if left else ''}) ceilings {ceilings(model)}",
            flush=True,
        )
        epoch += 1
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out_dir / "model.pt", {**checkpoint_config(args, channels, num_classes, height, levels,
                        mean, std), "epochs_done": epoch})  # fmt: skip
        if args.time_budget and epoch <= 2 and epochs > epoch:
            # the first epoch includes warm-up (cuDNN, allocator); fit the budget on the second
            fit = epoch + int((args.time_budget - (time.time() - train_start)) // max(epoch_seconds, 1e-6))
            fit = min(args.epochs, max(epoch, fit)) if epoch == 2 else (epoch if fit < 2 else epochs)
            if fit != epochs:
                epochs = fit
                total_steps = epochs * steps_per_epoch
                if epoch == epochs and limit < len(y_test):
                    test_acc = evaluate(model, x_test, y_test, norm, autocast)
                print(f"time budget {args.time_budget:.0f} s: training {epochs} epochs", flush=True)
        save_train_state(state_path, args, model, optimizer, generator,
                         {"epoch": epoch, "step": step, "epochs": epochs, "seconds": time.time() - train_start,
                          "train_acc": train_acc, "test_acc": test_acc})  # fmt: skip
    train_seconds = time.time() - train_start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.contiguous_format)
    config = checkpoint_config(args, channels, num_classes, height, levels, mean, std)
    save_checkpoint(model, out / "model.pt", config)
    result = {
        "arch": args.arch,
        **({"width": args.width} if args.width else {}),
        "dataset": args.dataset,
        "act": args.act,
        "levels": levels,
        "lam_init": args.lam_init,
        "epochs": epochs,
        "recipe": args.recipe,
        "label_smoothing": args.label_smoothing,
        "schedule": args.schedule,
        **({"warmup_epochs": args.warmup_epochs} if args.schedule == "onecycle" else {}),
        "translate": args.translate,
        "whiten": bool(args.whiten),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "test_accuracy": round(test_acc, 6),
        "train_accuracy": round(train_acc, 6),
        "train_seconds": round(train_seconds, 1),
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "batch_size": args.batch_size,
        "optimizer": optimizer_name,
        "lr": base_lr,
        "weight_decay": weight_decay,
        "ceiling_lr_scale": ceiling_lr_scale,
        "train_samples": n,
        "test_samples": len(test_set),
        "ceilings": ceilings(model),
        "torch": torch.__version__,
    }
    if not args.no_export:
        from exporters import ExportError, export_onnx

        try:
            result["onnx_max_abs_diff"] = export_onnx(
                model,
                out / "model.onnx",
                (channels, height, width),
                config["preprocess"],
                activation=args.act,
                levels=levels,
                check_inputs=test_set.x[:64],
            )
        except ExportError as exc:
            return fail(str(exc))
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "result.json")
    print(f"test accuracy {100 * test_acc:.2f}% after {epochs} epochs, {train_seconds:.1f} s; wrote {out}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
