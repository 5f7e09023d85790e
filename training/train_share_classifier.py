"""Learn a sequence of classification tasks on one transformers backbone (paper Table 1 setting).

    accelerate launch training/train_share_classifier.py --model_name_or_path path/to/all-MiniLM-L6-v2 \\
        --task bbc=data/bbc --task tweets=data/tweets --task fortunes=data/fortunes \\
        --method share --output_dir out/share --max_train_steps 200

Each ``--task NAME=DIR`` folder holds ``train.jsonl`` and ``test.jsonl`` (``{"text"|"image": ...,
"label": ...}`` per line); tasks are learned in the order given, each with its own linear head.
After every task all tasks so far are evaluated: the accuracy matrix (rows: after task t; columns:
task i) goes to ``results.json`` / ``results.md`` with trainable-parameter and storage counts.

Methods (``--method``):
  share  the first task trains an ordinary PEFT LoRA that creates the Share subspace; every later
         task trains temporary factors (top ``--phi`` basis directions + ``(phi, p)`` coefficients,
         or ``--coefficients_only``) and is merged as a new style. Earlier tasks keep their cores.
  lora   one independent PEFT LoRA per task (the non-continual baseline: no forgetting, T adapters).
  full   sequential full fine-tuning of the backbone (forgets; one model).

The backbone runs without dropout, so an update depends only on the global batch: 2 processes with
batch 1 train what 1 process with batch 2 trains, and a resumed run ends where an uninterrupted one does.
``--evaluate DIR`` reloads a saved ``after-task-N`` folder (factors + heads) and prints its accuracy row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from share_diffusers.continual import ContinualClassifier, TaskDataError, accuracy_table, default_targets, load_task
from share_diffusers.continual.classifier import BatchEncoder, check_targets, load_backbone
from share_diffusers.continual.report import matrix_summary
from share_diffusers.core import ShareConfig, ShareError, ShareModel, load_factors, save_factors
from share_diffusers.core.adapters import LoraAdapter
from share_diffusers.core.trainable import attach_trainable, detach_trainable, trained_adapter
from share_diffusers.lora_files import lora_layers_from_state_dict
from share_diffusers.training_utils import (
    LR_SCHEDULERS,
    EpochShuffle,
    UsageError,
    check_at_least,
    check_common_arguments,
    check_output_dir,
    check_positive_rates,
    check_run_identity,
    check_whole_global_batches,
    checkpoint_extras,
    checkpoint_step,
    checkpoint_trainable_parameters_only,
    clear_outputs,
    destroy_process_group,
    end_training,
    find_checkpoint,
    make_accelerator,
    make_lr_scheduler,
    run_identity,
    save_checkpoint,
)

logger = logging.getLogger("train_share_classifier")
BYTES_PER_NUMBER = 4  # counts are for float32 storage
OUTPUTS = ("checkpoint-*", "after-task-*", "results.json", "results.md", "logs")  # what a run writes
# What a checkpoint must have been saved with for this run to continue it (the task of a global step follows
# from --max_train_steps; the trained tensors mean something else under any other value of the rest).
RUN_IDENTITY = (
    "model_name_or_path",
    "task",
    "method",
    "max_train_steps",
    "rank",
    "pseudo_rank",
    "phi",
    "lora_rank",
    "lora_alpha",
    "coefficients_only",
    "target_modules",
)
# The options only some methods use, and their defaults: None on the command line means "not given", so a
# method that would ignore one refuses it instead (check_arguments).
METHOD_OPTIONS = {
    "rank": ({"share"}, 32),
    "pseudo_rank": ({"share"}, 8),
    "phi": ({"share"}, 8),
    "lora_rank": ({"share", "lora"}, 8),
    "lora_alpha": ({"share", "lora"}, 16.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model_name_or_path", default=None, help="transformers backbone folder or repo id")
    add("--task", action="append", default=[], metavar="NAME=DIR", help="a task folder; repeat, in order")
    add("--method", choices=["share", "lora", "full"], default="share")
    add("--output_dir", default=None, help="must be empty, unless resuming or with --overwrite_output_dir")
    add(
        "--overwrite_output_dir",
        action="store_true",
        help="delete what an earlier run wrote in --output_dir (checkpoints, after-task-N, results, logs) first",
    )
    add("--evaluate", default=None, metavar="DIR", help="evaluate a saved after-task-N folder and exit")
    add("--target_modules", nargs="+", default=None, help="default: attention linears / 1x1 convolutions")
    add("--rank", type=int, default=None, help="share: k, basis vectors per layer of the subspace (default 32)")
    add("--pseudo_rank", type=int, default=None, help="share: p, rank of each task's core (default 8)")
    add("--phi", type=int, default=None, help="share: temporary basis vectors trained per layer (default 8)")
    add("--coefficients_only", action="store_true", help="share: train only the new task's (k, p) cores")
    add("--lora_rank", type=int, default=None, help="rank of the PEFT LoRAs (first Share task, lora; default 8)")
    add("--lora_alpha", type=float, default=None, help="alpha of the PEFT LoRAs (default 16)")
    add("--train_batch_size", type=int, default=16, help="per process")
    add("--eval_batch_size", type=int, default=64)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-3, help="adapter (or, with full, backbone) learning rate")
    add("--head_learning_rate", type=float, default=1e-3)
    add("--lr_scheduler", default="constant", help=f"one of {', '.join(LR_SCHEDULERS)} (diffusers.optimization)")
    add("--lr_warmup_steps", type=int, default=0)
    add("--max_train_steps", type=int, default=200, help="optimizer steps per task")
    add("--max_length", type=int, default=128, help="text: tokens per example")
    add("--resolution", type=int, default=112, help="images: side in pixels")
    add("--max_eval_samples", type=int, default=None, help="first N test examples of each task")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    add("--seed", type=int, default=0)
    add("--checkpointing_steps", type=int, default=0, help="resumable state every N steps (0: never)")
    add("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    add("--report_to", default=None)
    args = parser.parse_args(argv)
    if not args.evaluate and (not args.task or not args.output_dir or not args.model_name_or_path):
        parser.error("--model_name_or_path, --task (at least one) and --output_dir are needed (or --evaluate DIR)")
    return args


def check_arguments(args: argparse.Namespace) -> None:
    """Every refusal the command line alone decides, before data or models load; then the defaults of the
    options the method uses (``--evaluate`` takes its settings from the saved folder).

    Raises:
        UsageError: the first bad value or combination, naming the flags.
    """
    if not args.evaluate:
        check_common_arguments(args)
        check_at_least(args, eval_batch_size=1, max_length=1, resolution=1)
        if args.max_eval_samples is not None:
            check_at_least(args, max_eval_samples=1)
        check_positive_rates(args, "head_learning_rate")
        ignored = [f"--{name}" for name, (methods, _) in METHOD_OPTIONS.items() if args.method not in methods]
        ignored = [flag for flag in ignored if getattr(args, flag[2:]) is not None]
        if args.coefficients_only and args.method != "share":
            ignored.append("--coefficients_only")
        if ignored:
            raise UsageError(f"--method {args.method} does not use {', '.join(ignored)}; drop them")
        if args.coefficients_only and args.phi is not None:
            raise UsageError("--coefficients_only trains no temporary basis directions; drop --phi")
    for name, (_, default) in METHOD_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not args.evaluate:
        check_at_least(args, rank=1, pseudo_rank=1, phi=1, lora_rank=1)
        if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
            raise UsageError(f"--lora_alpha must be a finite number above 0, got {args.lora_alpha}")


def parse_task_specs(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, separator, folder = spec.partition("=")
        if not separator or not name or not folder:
            raise TaskDataError(f"--task {spec!r}: expected NAME=DIR")
        pairs.append((name, folder))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise TaskDataError(f"--task names must be unique; got {names}")
    return pairs


# -- methods: what trains for a task, how a finished task is kept, how a task is selected ----------


class ShareMethod:
    """First task: a PEFT LoRA that seeds the subspace; later tasks: temporary factors, merged as styles."""

    def __init__(self, model: ContinualClassifier, targets, args):
        self.model, self.targets, self.args = model, targets, args
        self.share: ShareModel | None = None
        self.peft = None

    def begin(self, index: int) -> list[torch.nn.Parameter]:
        if self.share is None:
            self.peft = _attach_lora(self.model.backbone, self.targets, self.args, seed=self.args.seed + index)
            return [p for p in self.model.backbone.parameters() if p.requires_grad]
        modules = attach_trainable(
            self.share.layers,
            self.args.pseudo_rank,
            phi=self.args.phi,
            coefficients_only=self.args.coefficients_only,
            seed=self.args.seed + index,
        )
        return [p for module in modules.values() for p in module.parameters() if p.requires_grad]

    def end(self, index: int, name: str) -> None:
        if self.share is None:
            adapter = _lora_adapter(self.peft, self.args, source={"task": name, "trained_as": "PEFT LoRA"})
            _detach_lora(self.peft)
            self.peft = None
            config = ShareConfig(rank=self.args.rank, pseudo_rank=self.args.pseudo_rank)
            self.share = ShareModel.inject(self.model.backbone, target_modules=self.targets, config=config)
        else:
            adapter = trained_adapter(self.share.layers, source={"task": name})
            detach_trainable(self.share.layers)
        self.share.merge(adapter, name)

    @contextlib.contextmanager
    def selected(self, index: int, name: str):
        self.share.set_style(name)
        try:
            yield
        finally:
            self.share.set_style(None)

    def stored_numbers(self) -> int:
        return self.share.factors.storage_numbers()

    def save(self, folder: Path) -> None:
        save_factors(self.share.factors, folder / "factors")

    def restore(self, folder: Path) -> None:
        self.share = ShareModel.inject(self.model.backbone, load_factors(folder / "factors"), self.targets)


class LoraMethod:
    """One independent PEFT LoRA per task, swapped in to evaluate its task."""

    def __init__(self, model: ContinualClassifier, targets, args):
        self.model, self.targets, self.args = model, targets, args
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.peft = None

    def begin(self, index: int) -> list[torch.nn.Parameter]:
        self.peft = _attach_lora(self.model.backbone, self.targets, self.args, seed=self.args.seed + index)
        return [p for p in self.model.backbone.parameters() if p.requires_grad]

    def end(self, index: int, name: str) -> None:
        self.adapters[name] = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.peft).items()}
        _detach_lora(self.peft)
        self.peft = None

    @contextlib.contextmanager
    def selected(self, index: int, name: str):
        peft = _attach_lora(self.model.backbone, self.targets, self.args, seed=0)
        set_peft_model_state_dict(peft, self.adapters[name])
        try:
            yield
        finally:
            _detach_lora(peft)

    def stored_numbers(self) -> int:
        return sum(t.numel() for adapter in self.adapters.values() for t in adapter.values())

    def save(self, folder: Path) -> None:
        (folder / "adapters").mkdir(parents=True, exist_ok=True)
        for name, tensors in self.adapters.items():
            save_file(tensors, folder / "adapters" / f"{name}.safetensors")

    def restore(self, folder: Path) -> None:
        self.adapters = {path.stem: load_file(path) for path in sorted((folder / "adapters").glob("*.safetensors"))}


class FullMethod:
    """Sequential full fine-tuning: the whole backbone trains on each task in turn."""

    def __init__(self, model: ContinualClassifier, targets, args):
        self.model = model

    def begin(self, index: int) -> list[torch.nn.Parameter]:
        self.model.backbone.requires_grad_(True)
        return list(self.model.backbone.parameters())

    def end(self, index: int, name: str) -> None:
        self.model.backbone.requires_grad_(False)

    def selected(self, index: int, name: str):
        return contextlib.nullcontext()

    def stored_numbers(self) -> int:
        return sum(p.numel() for p in self.model.backbone.parameters())

    def save(self, folder: Path) -> None:
        save_model(self.model.backbone, str(folder / "backbone.safetensors"))

    def restore(self, folder: Path) -> None:
        load_model(self.model.backbone, str(folder / "backbone.safetensors"))


METHODS = {"share": ShareMethod, "lora": LoraMethod, "full": FullMethod}


def _attach_lora(backbone, targets, args, seed: int):
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(backbone, config)


def _detach_lora(peft) -> None:
    """Remove the LoRA layers (unmerged) and the ``peft_config`` PEFT leaves on the backbone."""
    backbone = peft.unload()
    if hasattr(backbone, "peft_config"):
        del backbone.peft_config


def _lora_adapter(peft, args, source: dict) -> LoraAdapter:
    """The trained PEFT LoRA as an adapter for ``ShareFactors.merge``.

    The tensors stay where training left them (a GPU, any mixed-precision dtype), detached from the
    parameters' graph: the merge moves each layer to the CPU in float64 once (``LoraLayer.canonical``).
    """
    tensors = {key: tensor.detach() for key, tensor in get_peft_model_state_dict(peft).items()}
    layers, _ = lora_layers_from_state_dict(tensors, {"r": args.lora_rank, "lora_alpha": args.lora_alpha}, "PEFT LoRA")
    return LoraAdapter(layers, source=source)


# -- the run ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.evaluate:
        return evaluate_saved(args)
    output_dir = Path(args.output_dir)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, resuming=checkpoint is not None, overwrite=args.overwrite_output_dir)
    if checkpoint is not None:
        check_run_identity(checkpoint, run_identity(args, RUN_IDENTITY))
    tasks = [load_task(name, folder, args.max_eval_samples) for name, folder in parse_task_specs(args.task)]
    modalities = {task.modality for task in tasks}
    if len(modalities) > 1:
        raise TaskDataError(f"tasks mix modalities {sorted(modalities)}; one backbone takes one kind of input")
    accelerator = make_accelerator(args, output_dir)
    for task in tasks:
        check_whole_global_batches(
            len(task.train), args.train_batch_size, accelerator.num_processes, f"training examples of {task.name!r}"
        )
    checkpoint_trainable_parameters_only(accelerator)  # adapters and head, not the frozen backbone (all: full)
    set_seed(args.seed)
    model, encoder, targets = build_model(args, tasks)  # refuses a backbone that does not fit before any deletion
    if args.overwrite_output_dir:
        clear_outputs(accelerator, output_dir, OUTPUTS)
    method = METHODS[args.method](model, targets, args)
    record = {"method": args.method, "tasks": [t.name for t in tasks], "rows": [], "losses": [], "trainable": []}

    first_task, first_step = 0, 0
    if checkpoint is not None:
        global_step = checkpoint_step(checkpoint)
        first_task = (global_step - 1) // args.max_train_steps
        first_step = global_step - first_task * args.max_train_steps
        if first_task > 0:
            record = restore_snapshot(output_dir / f"after-task-{first_task}", model, method)
        logger.info("resuming from %s: task %d, step %d", checkpoint, first_task + 1, first_step)
    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers("train_share_classifier", config={k: str(v) for k, v in vars(args).items()})

    for index in range(first_task, len(tasks)):
        task = tasks[index]
        parameters = method.begin(index)
        head = model.heads[task.name]
        head.requires_grad_(True)
        trainable = sum(p.numel() for p in parameters) + sum(p.numel() for p in head.parameters())
        logger.info("task %d/%d %r: %s trainable parameters", index + 1, len(tasks), task.name, f"{trainable:,}")
        resume = checkpoint if index == first_task else None
        losses = train_task(accelerator, model, task, index, parameters, encoder, args, resume, first_step)
        head.requires_grad_(False)
        method.end(index, task.name)
        row = [evaluate(model, method, i, tasks[i], encoder, args, accelerator.device) for i in range(index + 1)]
        record["rows"].append(row)
        record["losses"].append(losses)
        record["trainable"].append(trainable)
        logger.info(
            "after %s: %s",
            task.name,
            ", ".join(f"{t.name} {a:.3f}" for t, a in zip(tasks[: len(row)], row, strict=True)),
        )
        if accelerator.is_main_process:
            save_snapshot(output_dir / f"after-task-{index + 1}", model, method, record, args)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        write_results(output_dir, record, model, method, tasks)
    end_training(accelerator)
    return 0


def build_model(args, tasks):
    backbone, tokenizer = load_backbone(args.model_name_or_path, tasks[0].modality)
    model = ContinualClassifier(backbone, tasks[0].modality, {t.name: t.num_labels for t in tasks}, seed=args.seed)
    model.requires_grad_(False)
    model.eval()  # no dropout: updates depend on the global batch only (process count, resume)
    encoder = BatchEncoder(tasks[0].modality, tokenizer, args.max_length, args.resolution)
    if args.target_modules:
        check_targets(backbone, args.target_modules, share=args.method == "share")
    return model, encoder, args.target_modules or default_targets(backbone)


def train_task(accelerator, model, task, index, parameters, encoder, args, resume, first_step) -> list[float]:
    """Train one task; returns the mean loss of its first and last ``max(1, steps // 10)`` steps."""
    head = model.heads[task.name]
    optimizer = torch.optim.AdamW(
        [
            {"params": parameters, "lr": args.learning_rate},
            {"params": list(head.parameters()), "lr": args.head_learning_rate},
        ],
        weight_decay=0.0,
    )
    loader = DataLoader(
        task.train,
        batch_size=args.train_batch_size,
        sampler=EpochShuffle(len(task.train), (args.seed + index) * 7919),
        collate_fn=encoder,
    )
    scheduler = make_lr_scheduler(
        args.lr_scheduler, optimizer, args.lr_warmup_steps, args.max_train_steps, accelerator.num_processes
    )
    wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    step = 0
    history: list[float] = []  # this task's loss at each step
    if resume is not None:
        accelerator.load_state(str(resume))
        step = first_step
        history = [float(value) for value in checkpoint_extras(resume).get("task_losses", [])][:step]
    # accelerate also steps the optimizer at the end of the data loader: a last, shorter accumulation counts
    steps_per_epoch = max(math.ceil(len(loader) / args.gradient_accumulation_steps), 1)
    offset = index * args.max_train_steps
    progress = tqdm(total=args.max_train_steps, initial=step, desc=task.name, disable=not accelerator.is_main_process)
    while step < args.max_train_steps:
        loader.set_epoch(step // steps_per_epoch)
        skip = (step % steps_per_epoch) * args.gradient_accumulation_steps
        for batch, labels in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(wrapped):
                loss = torch.nn.functional.cross_entropy(wrapped(batch, task.name), labels)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            value = accelerator.gather(loss.detach()[None]).mean().item()
            history.append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}")
            accelerator.log({f"{task.name}/loss": value}, step=offset + step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    Path(args.output_dir),
                    offset + step,
                    args.checkpoints_total_limit,
                    # a resumed run reports the losses of the whole task, and continues only the run that saved it
                    extras={"task_losses": history, "run": run_identity(args, RUN_IDENTITY)},
                )
            if step >= args.max_train_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    del wrapped
    accelerator.free_memory()  # the next task prepares fresh objects; no stale DDP hooks
    window = max(1, len(history) // 10)
    return [sum(history[:window]) / window, sum(history[-window:]) / window] if history else []


@torch.no_grad()
def evaluate(model, method, index: int, task, encoder, args, device) -> float:
    """Test accuracy (0..1) of task ``index`` with its head and its style/adapter selected."""
    correct = 0
    with method.selected(index, task.name):
        for start in range(0, len(task.test), args.eval_batch_size):
            batch, labels = encoder(task.test[start : start + args.eval_batch_size])
            batch = {key: value.to(device) for key, value in batch.items()}
            correct += int((model(batch, task.name).argmax(-1).cpu() == labels).sum())
    return correct / len(task.test)


# -- files ------------------------------------------------------------------------------------------


def save_snapshot(folder: Path, model, method, record: dict, args) -> None:
    """Everything needed to evaluate (and continue after) the tasks learned so far."""
    folder.mkdir(parents=True, exist_ok=True)
    method.save(folder)
    save_file({k: v.contiguous() for k, v in model.heads.state_dict().items()}, folder / "heads.safetensors")
    settings = {key: getattr(args, key) for key in ("model_name_or_path", "method", "task", "max_length")}
    settings.update(resolution=args.resolution, target_modules=args.target_modules, seed=args.seed)
    settings.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, max_eval_samples=args.max_eval_samples)
    (folder / "progress.json").write_text(json.dumps({"settings": settings, **record}, indent=1))


def restore_snapshot(folder: Path, model, method) -> dict:
    if not (folder / "progress.json").is_file():
        raise ShareError(f"{folder} is not a saved task state (no progress.json)")
    method.restore(folder)
    load_model(model.heads, str(folder / "heads.safetensors"))
    progress = json.loads((folder / "progress.json").read_text())
    return {key: progress[key] for key in ("method", "tasks", "rows", "losses", "trainable")}


def write_results(output_dir: Path, record: dict, model, method, tasks) -> None:
    heads = sum(p.numel() for p in model.heads.parameters())
    record = {
        **record,
        "stored_numbers": method.stored_numbers() + heads,
        "stored_bytes": (method.stored_numbers() + heads) * BYTES_PER_NUMBER,
        "summary": matrix_summary(record["rows"]),
    }
    (output_dir / "results.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# {record['method']}: accuracy (%) on each task after learning each task",
        "",
        accuracy_table(record["rows"], record["tasks"]),
        "",
        f"Trainable parameters per task: {', '.join(f'{n:,}' for n in record['trainable'])}; "
        f"stored after the last task: {record['stored_bytes'] / 2**20:.2f} MiB (float32, heads included).",
    ]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def evaluate_saved(args) -> int:
    """Reload ``args.evaluate`` (an after-task-N folder) on its backbone and print its accuracy row as JSON."""
    folder = Path(args.evaluate)
    if not (folder / "progress.json").is_file():
        raise ShareError(f"{folder} is not a saved task state (no progress.json)")
    settings = json.loads((folder / "progress.json").read_text())["settings"]
    for key, value in settings.items():
        if key in ("task", "max_eval_samples") and getattr(args, key):
            continue  # given on this command line: the tasks' folders elsewhere, fewer test examples
        setattr(args, key, value)
    trained = [name for name, _ in parse_task_specs(settings["task"])]
    named = [name for name, _ in parse_task_specs(args.task)]
    if named != trained:  # the heads are saved by task name (a state-dict traceback before)
        raise ShareError(
            f"--task names {named} are not the tasks {folder} learned, in order: {trained}; give NAME=DIR for each "
            "of them, or leave --task out to use the saved folders"
        )
    tasks = [load_task(name, path, args.max_eval_samples) for name, path in parse_task_specs(args.task)]
    model, encoder, targets = build_model(args, tasks)
    method = METHODS[args.method](model, targets, args)
    record = restore_snapshot(folder, model, method)
    learned = tasks[: len(record["rows"])]
    row = [evaluate(model, method, i, task, encoder, args, "cpu") for i, task in enumerate(learned)]
    print(json.dumps({"tasks": [t.name for t in learned], "accuracy": row}))
    return 0


def cli(argv=None) -> int:
    """``main`` as the command line runs it: a refusal of bad input is one ``error:`` line and exit status 1."""
    try:
        return main(argv)
    except (UsageError, TaskDataError, ShareError) as error:  # bad input: one line, before any training step
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        destroy_process_group()  # on success end_training did it; not on an error


if __name__ == "__main__":
    sys.exit(cli())
