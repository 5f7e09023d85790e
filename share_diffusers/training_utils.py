"""Pieces the ``training/`` scripts share: the accelerator, a process-count-independent data order,
and finding the checkpoint to resume from."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def make_accelerator(args, output_dir: Path) -> Accelerator:
    """An ``Accelerator`` from the usual trainer options, logging under ``output_dir/logs``."""
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


class EpochShuffle(Sampler):
    """A fresh permutation each epoch from ``seed + epoch`` alone, so the global order of samples is the
    same whatever the number of processes accelerate shards it over (and after a resume)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def checkpoint_step(path: Path) -> int:
    """The global step a ``checkpoint-<step>`` folder was saved at."""
    return int(path.name.split("-")[1])


def find_checkpoint(resume_from: str | None, output_dir: Path) -> Path | None:
    """``--resume_from_checkpoint``: None, a ``checkpoint-N`` folder, or ``latest`` in ``output_dir``."""
    if not resume_from:
        return None
    if resume_from != "latest":
        if not Path(resume_from).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder")
        return Path(resume_from)
    found = sorted(output_dir.glob("checkpoint-*"), key=checkpoint_step)
    if not found:
        logger.info("no checkpoint in %s: starting from scratch", output_dir)
    return found[-1] if found else None


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restores every object registered with ``accelerator`` from ``path``; returns its global step."""
    accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d", path, checkpoint_step(path))
    return checkpoint_step(path)
