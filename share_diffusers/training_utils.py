"""Pieces the ``training/`` scripts share: the accelerator, a process-count-independent data order, the
learning-rate schedule, checkpoints (trainable tensors only, written atomically) and the checks a command
line passes before any model loads."""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import SchedulerType, get_scheduler
from safetensors import safe_open
from torch.utils.data import Sampler

from share_diffusers.core import ShareError
from share_diffusers.runtime import MAX_SEED

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# piecewise_constant needs step rules, which the trainers do not take
POLYNOMIAL_LR_END = 1e-7  # diffusers.optimization.get_polynomial_decay_schedule_with_warmup's lr_end
LR_SCHEDULERS = [kind.value for kind in SchedulerType if kind is not SchedulerType.PIECEWISE_CONSTANT]
SCHEDULERS_WITHOUT_WARMUP = ("constant",)


class UsageError(ValueError):
    """A command line a trainer refuses (a bad value, flags that do not go together); raised before any model
    loads."""


class ResumeError(ShareError, ValueError):
    """A checkpoint does not hold what this run trains (other settings than the run that saved it)."""


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


def check_whole_global_batches(size: int, batch_size: int, num_processes: int, what: str) -> None:
    """Refuses a data set that does not fill whole global batches when several processes train.

    accelerate (``even_batches=True``) completes the last global batch of every epoch with samples from its
    start, so those samples would count twice in that step, and the run would no longer train what one
    process with the same global batch trains. One process has no such padding (its last batch is shorter).

    Raises:
        UsageError: naming the sizes and what to change.
    """
    global_batch = batch_size * num_processes
    if num_processes > 1 and size % global_batch:
        raise UsageError(
            f"{size} {what} do not fill whole global batches of {global_batch} (--train_batch_size {batch_size} x "
            f"{num_processes} processes): accelerate would repeat {global_batch - size % global_batch} of them at the "
            f"end of every epoch; use a multiple of {global_batch} {what}, or a batch size and process count whose "
            f"product divides {size}"
        )


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, max_train_steps: int, num_processes: int):
    """diffusers' ``get_scheduler`` with its lengths in the steps accelerate counts.

    ``accelerator.prepare`` wraps the scheduler in an ``AcceleratedScheduler``, which steps it once per
    process for each optimizer step (it assumes every process takes its own share of one epoch's batches).
    Warm-up and total length are therefore given times ``num_processes``, as diffusers'
    ``train_dreambooth_lora_flux.py`` does, so N processes follow the one-process schedule step for step.
    """
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )


# -- checkpoints -------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    """The global step a ``checkpoint-<step>`` folder was saved at."""
    found = CHECKPOINT_NAME.fullmatch(Path(path).name)
    if found is None:
        raise ValueError(f"{path} is not named checkpoint-<step>")
    return int(found[1])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The finished ``checkpoint-<step>`` folders in ``output_dir``, oldest first; a save still under way or cut
    short (``checkpoint-<step>.tmp``) and other names are not checkpoints."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name)]
    return sorted(found, key=checkpoint_step)


def check_resume_from(resume_from: str | None) -> None:
    """``--resume_from_checkpoint``: ``latest``, or an existing folder named ``checkpoint-<step>``.

    Raises:
        UsageError: a folder that does not exist or is not named ``checkpoint-<step>``.
    """
    if not resume_from or resume_from == "latest":
        return
    if not Path(resume_from).is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder (or pass 'latest')")
    if CHECKPOINT_NAME.fullmatch(Path(resume_from).name) is None:
        raise UsageError(f"--resume_from_checkpoint {resume_from}: not a checkpoint-<step> folder")


def find_checkpoint(resume_from: str | None, output_dir: Path) -> Path | None:
    """``--resume_from_checkpoint``: None, a ``checkpoint-N`` folder, or ``latest`` in ``output_dir``."""
    if not resume_from:
        return None
    if resume_from != "latest":
        if not Path(resume_from).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder")
        return Path(resume_from)
    found = list_checkpoints(output_dir)
    if not found:
        logger.info("no checkpoint in %s: starting from scratch", output_dir)
    return found[-1] if found else None


CHECKPOINT_EXTRAS = "training_state.json"


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    total_limit: int | None = None,
    extras: dict | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, atomically.

    Every process writes into ``checkpoint-<step>.tmp`` (each its own random states); once all are done the
    main process renames it, so a run killed during the save leaves no ``checkpoint-<step>`` that ``latest``
    would pick. Then only the newest ``total_limit`` checkpoints are kept (all when None).

    ``extras``: the script's own state (JSON: e.g. the losses so far), written by the main process inside the
    same atomic save; :func:`checkpoint_extras` reads it back. ``write_files(folder)``: more of the script's own
    files, written by the main process into the folder before it is renamed.
    """
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"{final.name}.tmp"
    if accelerator.is_main_process and partial.exists():  # left by a run killed while saving
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extras is not None:
            (partial / CHECKPOINT_EXTRAS).write_text(json.dumps(extras))
        if write_files is not None:
            write_files(partial)
        if final.exists():  # a resumed run passing a step it had saved before
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_extras(path: Path) -> dict:
    """The ``extras`` a checkpoint was saved with (:func:`save_checkpoint`); empty when it has none."""
    file = Path(path) / CHECKPOINT_EXTRAS
    if not file.is_file():
        return {}
    try:
        extras = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShareError(f"{file}: not a JSON document ({error})") from None
    if not isinstance(extras, dict):
        raise ShareError(f"{file}: expected a JSON object, got {type(extras).__name__}")
    return extras


def run_identity(args, names: tuple[str, ...]) -> dict:
    """The values of the options ``names`` that a checkpoint must share with the run that resumes it (saved in its
    ``extras`` as ``"run"``); a local path counts by where it is, not how it was typed."""
    identity = {}
    for name in names:
        value = getattr(args, name)
        if isinstance(value, str) and Path(value).exists():
            value = str(Path(value).resolve())
        identity[name] = value
    return identity


def check_run_identity(path: Path, identity: dict) -> None:
    """Refuses to resume from ``path`` when it was saved by a run with other values of ``identity``'s options (a
    checkpoint saved without them, by an older version, is taken as it is).

    Raises:
        ResumeError: naming the checkpoint, the first option that differs and both values.
    """
    saved = checkpoint_extras(path).get("run")
    if not isinstance(saved, dict):
        return
    for name, value in identity.items():
        if name in saved and saved[name] != value:
            raise ResumeError(
                f"{path} was saved by a run with --{name} {saved[name]!r}, this run has {value!r}: its trained "
                "tensors belong to that run; resume with its settings, or start in another --output_dir"
            )


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restores every object registered with ``accelerator`` from ``path``; returns its global step."""
    accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d", path, checkpoint_step(path))
    return checkpoint_step(path)


def checkpoint_trainable_parameters_only(accelerator: Accelerator) -> None:
    """Makes ``accelerator.save_state`` write only the parameters that train, and ``load_state`` read them back.

    A prepared model is saved whole by default: at FLUX.1 size 24 GB of frozen transformer per checkpoint for
    a few MB of factors. The frozen weights come from the base model on resume, as on the first start, so the
    run continues bit for bit. Only for models whose frozen state is rebuilt that way: buffers are not kept.
    Names are those of the unwrapped model, without DDP's ``module.`` prefix whatever the process count.
    """

    def keep_trainable(models, weights, output_dir) -> None:
        if len(weights) != len(models):  # FSDP, DeepSpeed: accelerate saves those models its own way
            return
        for index, model in enumerate(models):
            module = accelerator.unwrap_model(model)
            weights[index] = OrderedDict(
                (name, parameter.detach()) for name, parameter in module.named_parameters() if parameter.requires_grad
            )

    def load_trainable(models, input_dir) -> None:
        for index, model in enumerate(models):
            _load_trainable(accelerator.unwrap_model(model), Path(input_dir) / _weights_name(index))
        models.clear()  # loaded: accelerate's strict loader would want every frozen weight

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def _weights_name(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def _load_trainable(module: torch.nn.Module, path: Path) -> None:
    """The trainable parameters of ``module`` from ``path`` (which may hold more: a whole-model checkpoint)."""
    wanted = {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}
    if not path.is_file():
        raise ResumeError(f"{path} is missing: {path.parent} is not a finished checkpoint of this trainer")
    with safe_open(str(path), framework="pt") as stored:
        keys = set(stored.keys())
        missing = sorted(set(wanted) - keys)
        if missing:
            raise ResumeError(
                f"{path.parent} lacks {len(missing)} of the {len(wanted)} tensors this run trains, "
                f"e.g. {missing[0]!r}: resume with the settings that saved it"
            )
        with torch.no_grad():
            for name, parameter in wanted.items():
                tensor = stored.get_tensor(name)
                if tensor.shape != parameter.shape:
                    raise ResumeError(
                        f"size mismatch for {name}: the checkpoint {path.parent} has {tuple(tensor.shape)} but this "
                        f"run trains {tuple(parameter.shape)}; resume with the settings that saved it"
                    )
                parameter.copy_(tensor)


# -- the command line and the output folder ----------------------------------------------------------------


def check_common_arguments(args) -> None:
    """The checks every trainer's options need, before anything loads (``--checkpoints_total_limit`` and
    ``--overwrite_output_dir`` where the trainer has them).

    Raises:
        UsageError: the first bad value or combination, in one line naming the flags.
    """
    check_at_least(args, max_train_steps=1, train_batch_size=1, gradient_accumulation_steps=1)
    check_at_least(args, lr_warmup_steps=0, checkpointing_steps=0)
    check_positive_rates(args, "learning_rate")
    if args.lr_scheduler == "polynomial" and args.learning_rate <= POLYNOMIAL_LR_END:
        raise UsageError(
            f"--lr_scheduler polynomial decays to {POLYNOMIAL_LR_END:g} (diffusers' lr_end): --learning_rate must be "
            f"above it, got {args.learning_rate:g}"
        )
    check_report_to(args.report_to)
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise UsageError(f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.lr_warmup_steps and args.lr_scheduler in SCHEDULERS_WITHOUT_WARMUP:
        raise UsageError(
            f"--lr_warmup_steps needs a scheduler with a warm-up; --lr_scheduler {args.lr_scheduler} has none "
            "(constant_with_warmup is constant after one)"
        )
    if getattr(args, "checkpoints_total_limit", None) is not None:
        if args.checkpoints_total_limit < 1:
            raise UsageError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
        if not args.checkpointing_steps:
            raise UsageError("--checkpoints_total_limit needs --checkpointing_steps")
    check_resume_from(args.resume_from_checkpoint)
    if getattr(args, "overwrite_output_dir", False) and args.resume_from_checkpoint:
        raise UsageError(
            "--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would continue from; pass one"
        )


def check_report_to(report_to: str | None) -> None:
    """``--report_to``: one of accelerate's trackers, installed (accelerate raised a traceback for an unknown
    name and only warned for a missing package, then trained to the end logging nothing).

    Raises:
        UsageError: naming the tracker and the choices or the package to install.
    """
    if report_to is None:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [kind.value for kind in LoggerType]
    if report_to not in known:
        raise UsageError(f"--report_to {report_to!r} is not one of accelerate's trackers: {', '.join(known)}")
    available = [str(getattr(kind, "value", kind)) for kind in get_available_trackers()]
    if report_to != "all" and report_to not in available:
        raise UsageError(f"--report_to {report_to}: its package is not installed (pip install {report_to})")


def check_at_least(args, **lows: int) -> None:
    """Each ``--name`` of ``lows`` (option name -> least value) is at least that.

    Raises:
        UsageError: naming the first option below its least value.
    """
    for name, low in lows.items():
        if getattr(args, name) < low:
            raise UsageError(f"--{name} must be at least {low}, got {getattr(args, name)}")


def check_positive_rates(args, *names: str) -> None:
    """Each ``--name`` (a learning rate) is a finite number above 0: 0 trains nothing, a negative rate climbs the
    loss and NaN fills the weights with NaN, none of which a run should find out after its first step.

    Raises:
        UsageError: naming the first such option.
    """
    for name in names:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a finite number above 0, got {value}")


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuses a path that is a file (or lies under one), and a folder that holds anything, unless the run
    resumes or may overwrite.

    Raises:
        UsageError: naming the folder, one of its entries and the two ways on; or the file in the way (found
            only when the first output was written, after the whole training, before).
    """
    blocking = next((path for path in (output_dir, *output_dir.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--output_dir {output_dir}: {blocking} is a file, not a folder")
    if resuming or overwrite or not output_dir.is_dir():
        return
    entries = sorted(path.name for path in output_dir.iterdir())
    if entries:
        more = " and more" if len(entries) > 1 else ""
        raise UsageError(
            f"--output_dir {output_dir} is not empty (it holds {entries[0]!r}{more}); "
            "pass --overwrite_output_dir to replace what an earlier run wrote there, or --resume_from_checkpoint "
            "latest to continue it"
        )


def check_inputs_survive(output_dir: Path, patterns: tuple[str, ...], inputs: dict[str, str | None]) -> None:
    """``--overwrite_output_dir``: refuses a run whose input lies in what :func:`clear_outputs` would delete
    (``--share_factors out/factors --output_dir out`` deleted the factors it was about to load). Call it before
    any model loads; it deletes nothing.

    Raises:
        UsageError: naming the output that would go and the argument (``inputs``: argument name -> path, e.g.
            ``--share_factors``; a Hub id or None is skipped) it holds.
    """
    doomed = [path.resolve() for pattern in patterns for path in output_dir.glob(pattern)]
    for argument, value in inputs.items():
        if value is None or not Path(value).exists():
            continue  # a Hub id, or nothing given
        source = Path(value).resolve()
        for path in doomed:
            if source == path or path in source.parents:
                raise UsageError(
                    f"--overwrite_output_dir would delete {path}, which holds {argument} {value}; "
                    "write to another --output_dir"
                )


def clear_outputs(
    accelerator: Accelerator, output_dir: Path, patterns: tuple[str, ...], inputs: dict[str, str | None] | None = None
) -> None:
    """``--overwrite_output_dir``: the main process deletes what the trainer writes (``patterns``, globbed in
    ``output_dir``) and leaves anything else; every process waits for it.

    Raises:
        UsageError: an input of the run lies in what would be deleted (:func:`check_inputs_survive`), checked on
            every process before anything is deleted.
    """
    check_inputs_survive(output_dir, patterns, inputs or {})
    if accelerator.is_main_process and output_dir.is_dir():
        for pattern in patterns:
            for path in sorted(output_dir.glob(pattern)):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                logger.info("--overwrite_output_dir: deleted %s", path)
    accelerator.wait_for_everyone()


def end_training(accelerator: Accelerator) -> None:
    """Every process waits for the others (the main one may still be saving), lets go of what ``prepare``
    wrapped, then ``accelerator.end_training`` (trackers) and the process group's teardown.

    The caller must have dropped its own references to the prepared objects first. Why: a DDP model's reducer
    holds the process group, and freeing the reducer after the group was destroyed (when ``main`` returns) runs
    gloo's teardown with the GIL held, which joins a worker thread that waits for the GIL to free a finished
    collective's tensors: a deadlock (py-spy in a CI check: rank 0 in ``~ProcessGroupGloo`` under
    ``Reducer::~Reducer``, its worker in ``gil_scoped_acquire``). Freed first, the reducer leaves the group to
    ``destroy_process_group``, whose release does not hold the GIL. accelerate >= 0.34 tears the group down in
    ``end_training`` too, except in notebook-launched (forked) processes; this one does not depend on that.
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # accelerate's own references to the prepared model, optimizer, loader, scheduler
    gc.collect()
    accelerator.end_training()
    destroy_process_group()


def destroy_process_group() -> None:
    """Tears down the default process group of a multi-process run, if one is up.

    A run that stops on an error never reaches ``end_training``; left to the interpreter's exit, gloo's
    teardown can hang a process whose peer has gone (and torch warns of leaked resources), so the trainers'
    command lines call this on every way out.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
