"""The one training skeleton the three trainers share (pytorch/examples style).

:class:`EpochLoop` is the loop: for each epoch, ``train_one_epoch`` (AdamW, linear warm-up then
cosine decay per step, mixed precision on CUDA, a progress bar) -> validate -> early stopping on a
monitored figure (``patience`` epochs without an improvement of more than ``min_delta``) -> ``best.pt``
when the figure improved, ``last.pt`` (with the optimizer, scheduler, RNG states and the loop's
progress, so a run resumes where it stopped) and ``history.csv`` every epoch, all written atomically,
so killing training at any moment leaves them readable. Under ``torchrun`` the main process
validates and writes, and tells the others when to stop.

A trainer subclasses it and supplies what differs between the systems: the loss of a batch, the
validation figures, which of them is monitored, how an epoch is described in the log, and the
metadata its checkpoints carry. Device choice (:func:`choose_device`), seeding
(:func:`seed_everything`) and the joint image-and-mask augmentation (:func:`transforms`) are here too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from model.common.files import atomic_write_text

BEST = "best.pt"
LAST = "last.pt"
HISTORY = "history.csv"


@dataclass(frozen=True)
class Rank:
    """This process's place in a ``torchrun`` launch; one process alone is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process validates, writes checkpoints and logs."""
        return self.rank == 0


def choose_device(rank: Rank | None = None) -> torch.device:
    """This process's GPU (``cuda:<local rank>``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", rank.local_rank if rank is not None else 0)
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's generators; a torch generator for the data loader's shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def transforms(image_size: int, train: bool) -> Any:
    """torchvision.transforms.v2 pipelines (work on image and mask together).

    Images are resized to a square without cropping, so a map at the input size resizes back onto
    the original image exactly. Training adds flips, 90-degree turns, a mild crop and colour jitter.
    """
    from torchvision.transforms import v2

    resize = v2.Resize((image_size, image_size), antialias=True)
    if not train:
        return resize
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                (image_size, image_size), scale=(0.8, 1.0), ratio=(0.75, 1.333), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
        ]
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total_steps`` (per step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        best: path of ``best.pt``.
        last: path of ``last.pt``.
        meta: the metadata of the last ``best.pt`` written (what :meth:`EpochLoop.save` returned),
            or the run's base metadata when no epoch improved.
        history: one row per epoch (as ``history.csv``).
        stopped_early: whether early stopping ended the run.
    """

    best: Path
    last: Path
    meta: Any
    history: list[dict[str, float]]
    stopped_early: bool


@dataclass
class LoopSettings:
    """The loop's knobs, as every trainer's config names them.

    Attributes:
        epochs: maximum epochs.
        patience: epochs without improvement before stopping.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (at most half the run).
        max_steps_per_epoch: stop each epoch early (smoke tests).
        amp: mixed precision on CUDA.
        progress: show progress bars.
        min_delta: how much the monitored figure must grow to count as an improvement.
    """

    epochs: int
    patience: int
    lr: float
    weight_decay: float
    warmup_steps: int = 0
    max_steps_per_epoch: int | None = None
    amp: bool = True
    progress: bool = True
    min_delta: float = 1e-4

    @classmethod
    def of(cls, config: Any, **overrides: Any) -> LoopSettings:
        """The knobs a trainer's config has under these names (the rest keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        found = {name: getattr(config, name) for name in names if hasattr(config, name)}
        return cls(**{**found, **overrides})


def run_record(config: Any, n_train: int, n_val: int, **more: Any) -> dict[str, Any]:
    """What a checkpoint's ``extra`` keeps of its run: the training config and the split sizes."""
    return {"train_config": dataclasses.asdict(config), "n_train": n_train, "n_val": n_val, **more}


class EpochLoop(ABC):
    """The epoch loop of every trainer (see the module docstring); subclasses supply the parts marked
    abstract.

    Args:
        model: the network (its weights are what is saved).
        loader: the training batches.
        out: run folder for ``best.pt``, ``last.pt`` and ``history.csv``.
        settings: the loop's knobs.
        device: where the model is.
        generator: the training loader's shuffling generator (its state is saved for resuming).
        rank: this process's place in a ``torchrun`` launch.
        net: what the training step calls, when not ``model`` (a DistributedDataParallel wrapper).
        sampler: the training loader's DistributedSampler, told each epoch.
    """

    label: ClassVar[str] = "epoch"  # names epochs in the progress bar and the log
    logger: ClassVar[logging.Logger] = logging.getLogger(__name__)  # the trainer's own logger

    def __init__(
        self,
        model: nn.Module,
        loader: DataLoader[Any],
        out: Path,
        settings: LoopSettings,
        device: torch.device,
        generator: torch.Generator,
        rank: Rank | None = None,
        net: nn.Module | None = None,
        sampler: DistributedSampler[Any] | None = None,
    ) -> None:
        self.model, self.net = model, net if net is not None else model
        self.loader, self.sampler, self.generator = loader, sampler, generator
        self.out, self.settings, self.device = Path(out), settings, device
        self.rank = rank if rank is not None else Rank()
        self.steps_per_epoch = (
            len(loader)
            if settings.max_steps_per_epoch is None
            else min(len(loader), settings.max_steps_per_epoch)
        )
        total = max(1, self.steps_per_epoch * settings.epochs)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.scheduler = warmup_cosine(self.optimizer, min(settings.warmup_steps, total // 2), total)
        self.amp = device.type == "cuda" and settings.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # the loop's progress (restored when resuming)
        self.epoch, self.best, self.bad_epochs = 0, -math.inf, 0
        self.history: list[dict[str, float]] = []
        self.train_loss = math.nan  # of the epoch being validated

    # -------------------------------------------------------------------- what a trainer supplies
    @abstractmethod
    def loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """The training loss of one batch (its forward pass under :meth:`autocast`) and the batch size."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """This epoch's validation figures (main process only)."""

    @abstractmethod
    def monitor(self, row: dict[str, float]) -> float:
        """The figure early stopping and ``best.pt`` follow, from an epoch's row (higher is better)."""

    @abstractmethod
    def describe(self, row: dict[str, float]) -> str:
        """The validation part of the epoch's log line."""

    @abstractmethod
    def save(self, path: Path, row: dict[str, float], best: bool) -> Any:
        """Write ``best.pt`` (``best``) or ``last.pt`` (with :meth:`resume_state`) for this epoch; the
        metadata written."""

    monitored: str = "the validation figure"  # named by the early-stopping log line

    # -------------------------------------------------------------------- the loop
    def autocast(self) -> torch.autocast:
        """Mixed precision for the forward pass, on CUDA when ``amp`` is on."""
        return torch.autocast(device_type=self.device.type, enabled=self.amp)

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training batches (at most ``steps_per_epoch``); the mean loss."""
        from tqdm import tqdm

        self.net.train()
        running, seen = 0.0, 0
        bar = tqdm(
            self.loader, total=self.steps_per_epoch, desc=f"{self.label} {epoch + 1}/{self.settings.epochs}",
            unit="batch", disable=not (self.settings.progress and self.rank.main), leave=False,
        )  # fmt: skip
        for step, batch in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            loss, size = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            running += loss.item() * size
            seen += size
            bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        return running / max(1, seen)

    def resume_state(self) -> dict[str, Any]:
        """What ``last.pt`` keeps to resume the loop: its progress and the RNG states."""
        return {
            "epoch": self.epoch,
            "best_metric": self.best,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "loader_rng": self.generator.get_state(),
        }

    def restore(self, optimizer: dict[str, Any], scheduler: dict[str, Any], state: dict[str, Any]) -> None:
        """Continue a run from what ``last.pt`` kept (:meth:`resume_state`)."""
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        self.epoch = int(state.get("epoch", 0))
        self.best = float(state.get("best_metric", -math.inf))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.history = list(state.get("history", []))
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["loader_rng"])

    def end_of_epoch(self, epoch: int, train_loss: float, started: float) -> Any:
        """Validate, log, write the checkpoints and the history (main process); the best metadata
        when this epoch improved, else None."""
        self.train_loss = train_loss
        row = self.validate()
        row.update(epoch=epoch + 1, train_loss=train_loss, seconds=time.perf_counter() - started)
        self.history.append(row)
        monitored = self.monitor(row)
        improved = monitored > self.best + self.settings.min_delta
        self.logger.info(
            "%s %d/%d: train loss %.4f, %s%s (%.0f s)",
            self.label, epoch + 1, self.settings.epochs, train_loss, self.describe(row),
            " (best)" if improved else "", row["seconds"],
        )  # fmt: skip
        self.epoch = epoch + 1
        best = None
        if improved:
            self.best, self.bad_epochs = monitored, 0
            best = self.save(self.out / BEST, row, best=True)
        else:
            self.bad_epochs += 1
        self.save(self.out / LAST, row, best=False)
        atomic_write_text(self.out / HISTORY, pd.DataFrame(self.history).to_csv(index=False))
        return best

    def fit(self, best: Any) -> TrainResult:
        """Run the remaining epochs.

        Args:
            best: the metadata to report when no epoch improves: that of an existing ``best.pt``
                (resuming) or the run's base metadata.
        """
        stopped_early = False
        for epoch in range(self.epoch, self.settings.epochs):
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            started = time.perf_counter()
            train_loss = self.train_one_epoch(epoch)
            if self.rank.world > 1:
                dist.barrier()
            if self.rank.main:
                improved = self.end_of_epoch(epoch, train_loss, started)
                best = improved if improved is not None else best
            else:
                self.epoch = epoch + 1
            stop = torch.tensor([int(self.rank.main and self.bad_epochs >= self.settings.patience)])
            if self.rank.world > 1:
                stop = stop.to(self.device)
                dist.broadcast(stop, src=0)
            if bool(stop.item()):
                self.logger.info(
                    "early stopping: %s has not improved for %d epochs",
                    self.monitored,
                    self.settings.patience,
                )
                stopped_early = True
                break
        return TrainResult(self.out / BEST, self.out / LAST, best, self.history, stopped_early)


__all__ = [
    "BEST",
    "HISTORY",
    "LAST",
    "EpochLoop",
    "LoopSettings",
    "Rank",
    "TrainResult",
    "choose_device",
    "run_record",
    "seed_everything",
    "transforms",
    "warmup_cosine",
]
