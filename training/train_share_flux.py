"""Learn a new Flux style from images as Share factors, then merge it into the checkpoint (paper Steps 2-3).

    accelerate launch training/train_share_flux.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --share_factors someone/flux-share-styles \\
        --instance_data_dir my-style-images --style_name my-style --output_dir out --max_train_steps 500

Images come with a caption each (``img.png`` + ``img.txt``, or a ``metadata.jsonl`` with ``file_name``
and ``text``). Only the temporary factors (top ``--phi`` basis columns and ``(phi, p)`` coefficients)
train, or with ``--coefficients_only`` only a new style's ``(k, p)`` cores against the frozen bases.
Without ``--share_factors`` the first style is learned from random directions (a LoRA of rank phi in
Share's parameterisation) and creates the subspace. ``--fine_tune_style`` instead trains a style the
checkpoint already holds: its ``(k, p)`` cores start from the stored ones and replace them, bases and
other styles untouched (the paper's Step 3, "eps can then be further fine-tuned": after a merge has
truncated the new style to k directions, its coefficients win back what they can in them). The same
script runs on a CPU, one GPU or many processes (``accelerate launch --num_processes N``). As in diffusers'
``train_dreambooth_lora_flux.py``, the frozen models (transformer, VAE, text encoders) are loaded in the
``--mixed_precision`` dtype and placed on the accelerator, while the factors being trained stay float32;
``--gradient_checkpointing`` and ``--cache_latents`` bring FLUX.1-dev within one GPU's memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate.utils import set_seed
from diffusers.training_utils import free_memory, offload_models
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core import ShapeMismatchError, ShareError, StyleError
from share_diffusers.core.factors import validate_style_name
from share_diffusers.core.inject import find_targets
from share_diffusers.core.trainable import (
    attach_style_cores,
    attach_trainable,
    count_parameters,
    detach_trainable,
    lora_parameter_count,
    trained_adapter,
    trained_cores,
)
from share_diffusers.flux_lora import FLUX_TARGET_PRESETS
from share_diffusers.flux_training import (
    CaptionEmbeddings,
    encode_captions,
    encode_images,
    encode_posteriors,
    flow_matching_loss,
    sample_latents,
)
from share_diffusers.hub import check_online_for_upload
from share_diffusers.training_utils import (
    LR_SCHEDULERS,
    EpochShuffle,
    UsageError,
    check_at_least,
    check_common_arguments,
    check_inputs_survive,
    check_output_dir,
    check_run_identity,
    check_whole_global_batches,
    checkpoint_step,
    checkpoint_trainable_parameters_only,
    clear_outputs,
    destroy_process_group,
    end_training,
    find_checkpoint,
    load_checkpoint,
    make_accelerator,
    make_lr_scheduler,
    run_identity,
    save_checkpoint,
)

logger = logging.getLogger("train_share_flux")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OUTPUTS = ("checkpoint-*", "factors", "validation", "logs")  # what a run writes in --output_dir
# Defaults of the options that only some modes use: None on the command line means "not given", so a mode
# that would ignore one refuses it instead (check_arguments).
MODE_DEFAULTS = {"rank": 32, "pseudo_rank": 8, "phi": 8, "target_modules": "attention"}
MAX_T5_TOKENS = 512  # FluxPipeline refuses a longer max_sequence_length
# What a checkpoint must have been saved with for this run to continue it: the trained tensors mean something
# else (or have other shapes) under any other value.
RUN_IDENTITY = (
    "pretrained_model_name_or_path",
    "share_factors",
    "style_name",
    "fine_tune_style",
    "coefficients_only",
    "rank",
    "pseudo_rank",
    "phi",
    "target_modules",
)


class DataError(ValueError):
    """The training data cannot be used; raised before any training step."""


class NonFiniteGradientError(ShareError):
    """A training step's gradient is NaN or infinite; raised before the step changes the factors."""


class EncodedData(NamedTuple):
    """``--cache_latents``: the data set through the frozen encoders once, kept on the CPU."""

    posteriors: torch.Tensor  # (N, 2c, h, w): each image's VAE mean and log-variance, in weight_dtype
    captions: CaptionEmbeddings  # every caption (and "" under --proportion_empty_prompts)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--pretrained_model_name_or_path", required=True, help="Flux repo id or folder")
    add("--share_factors", default=None, help="Share checkpoint (folder or Hub id) to add the style to")
    add("--style_name", required=True)
    add("--instance_data_dir", required=True, help="images with .txt captions, or metadata.jsonl")
    add("--output_dir", required=True, help="must be empty, unless resuming or with --overwrite_output_dir")
    add(
        "--overwrite_output_dir",
        action="store_true",
        help="delete what an earlier run wrote in --output_dir (checkpoints, factors, validation images, logs) first",
    )
    add("--resolution", type=int, default=512)
    add("--train_batch_size", type=int, default=1)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-3)
    add("--lr_scheduler", default="constant", help=f"one of {', '.join(LR_SCHEDULERS)} (diffusers.optimization)")
    add("--lr_warmup_steps", type=int, default=0)
    add(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="clip the gradient of the trained factors to this norm (diffusers' default; 0: no clipping)",
    )
    add("--max_train_steps", type=int, default=500)
    add(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="dtype of the frozen transformer, VAE and text encoders, and autocast for the forward (the factors "
        "being trained stay float32); default: accelerate's config ('accelerate launch --mixed_precision')",
    )
    add(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each transformer block's activations in the backward pass: far less activation memory "
        "for one more forward of the blocks per step",
    )
    add(
        "--cache_latents",
        action="store_true",
        help="encode every training image with the VAE, and every caption (and the empty prompt of "
        "--proportion_empty_prompts) with the text encoders, once before training; then keep the VAE and text "
        "encoders off the accelerator except for validation. Each step still draws its latent sample from the "
        "cached VAE posterior with the generator it would use without caching: the same run, lighter and faster",
    )
    add("--seed", type=int, default=0)
    add("--checkpointing_steps", type=int, default=0, help="save a resumable state every N steps (0: never)")
    add("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    add("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    add("--validation_prompt", default=None)
    add("--validation_steps", type=int, default=0, help="validation images every N steps (and at the end)")
    add("--num_validation_images", type=int, default=2)
    add(
        "--validation_inference_steps",
        type=int,
        default=28,
        help="denoising steps of validation images (FluxPipeline's default; 4 suits FLUX.1-schnell)",
    )
    add(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="guidance embedding value in training and validation, for guidance-distilled models such as "
        "FLUX.1-dev (diffusers' Flux LoRA script's default); models without one (schnell, the demo model) ignore it",
    )
    add("--weighting_scheme", default="none", choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"])
    add("--phi", type=int, default=None, help="temporary basis vectors per layer (paper: 1 .. k/4; default 8)")
    add("--pseudo_rank", type=int, default=None, help="p: rank of the new style's core (default 8)")
    add("--rank", type=int, default=None, help="k of a new subspace (no --share_factors; default 32)")
    add("--coefficients_only", action="store_true", help="train only the style's (k, p) cores")
    add(
        "--fine_tune_style",
        action="store_true",
        help="--style_name is held by --share_factors: fine-tune its (k, p) cores in the fixed subspace and store "
        "them in its place (paper Step 3); the other styles do not change",
    )
    add(
        "--target_modules",
        default=None,
        help="layers of a new subspace (no --share_factors): 'attention' (the paper's, the default), 'blocks' (every "
        "linear of the double and single blocks) or a regex over module names (PEFT's rule)",
    )
    add("--max_sequence_length", type=int, default=128)
    add(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="share of captions replaced by the empty prompt, so the style also holds in the unconditional "
        "branch of classifier-free guidance (as in diffusers' text-to-image scripts)",
    )
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None)
    add("--report_to", default=None, help="tensorboard, wandb, ... (accelerate trackers)")
    add("--dataloader_num_workers", type=int, default=0)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Every refusal the command line alone decides, before data or models load; then the defaults of the
    options the mode uses.

    Raises:
        UsageError: the first bad value or combination, naming the flags.
    """
    check_common_arguments(args)
    try:
        validate_style_name(args.style_name, [])
    except StyleError as error:
        raise UsageError(f"--style_name: {error}") from None
    check_at_least(
        args, resolution=1, num_validation_images=1, validation_steps=0, dataloader_num_workers=0, max_sequence_length=1
    )
    if args.max_sequence_length > MAX_T5_TOKENS:
        raise UsageError(
            f"--max_sequence_length must be at most {MAX_T5_TOKENS} (Flux's T5 limit), got {args.max_sequence_length}"
        )
    for name in ("max_grad_norm", "guidance_scale"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a finite number, at least 0, got {value}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise UsageError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.fine_tune_style:
        if not args.share_factors:
            raise UsageError("--fine_tune_style needs --share_factors holding the style --style_name")
        if args.coefficients_only:
            raise UsageError("--fine_tune_style trains the style's coefficients only already; drop --coefficients_only")
        given = [f"--{name}" for name in ("rank", "pseudo_rank", "phi") if getattr(args, name) is not None]
        if given:
            raise UsageError(
                f"--fine_tune_style trains the stored (k, p) cores of --style_name in the checkpoint's bases, which "
                f"fix k and p and train no new directions; drop {', '.join(given)}"
            )
    if args.share_factors and args.target_modules is not None:
        raise UsageError("--target_modules applies only to a new subspace; --share_factors fixes the layers")
    if args.share_factors and args.rank is not None:
        raise UsageError("--rank sets k of a new subspace; --share_factors fixes k (its checkpoint's); drop --rank")
    if args.coefficients_only and args.phi is not None:
        raise UsageError("--coefficients_only trains no temporary basis directions; drop --phi")
    if args.hub_model_id and not args.push_to_hub:
        raise UsageError("--hub_model_id names the repository of --push_to_hub; add --push_to_hub or drop it")
    if args.validation_steps and not args.validation_prompt:
        raise UsageError("--validation_steps needs --validation_prompt")
    if args.validation_inference_steps < 1:
        raise UsageError(f"--validation_inference_steps must be at least 1, got {args.validation_inference_steps}")
    given = {name: getattr(args, name) for name in ("rank", "pseudo_rank", "phi") if getattr(args, name) is not None}
    check_at_least(argparse.Namespace(**given), **dict.fromkeys(given, 1))
    for name, value in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


class CaptionedImages(Dataset):
    """``(image (3, R, R) in [-1, 1], caption, index)``: center-cropped and resized to ``resolution``.

    With ``load_pixels = False`` (the latents are cached) the image is None and no file is read.
    """

    def __init__(self, folder: str, resolution: int):
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"--instance_data_dir {folder} is not a folder")
        self.items = _metadata_items(root) if (root / "metadata.jsonl").is_file() else _caption_file_items(root)
        if not self.items:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.resolution = resolution
        self.load_pixels = True
        for path, _ in self.items:  # fail before training, not at step 900
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"{path} is not a readable image ({error})") from None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, caption = self.items[index]
        if not self.load_pixels:
            return None, caption, index
        with Image.open(path) as image:
            image = upright_rgb(image)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((self.resolution,) * 2, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels, caption, index


def upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` turned upright by its EXIF orientation (as diffusers' training scripts do), as 8-bit RGB.

    16-bit grayscale (``I;16``: 16-bit PNGs) is scaled to 8 bits first: Pillow's ``convert("RGB")`` clips its
    values at 255, which turns nearly every pixel of such an image white.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        levels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.round(levels).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _caption_file_items(root: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {root} have no caption file, e.g. {missing[0]} (expected "
            f"{Path(missing[0]).with_suffix('.txt').name}, or a metadata.jsonl)"
        )
    return [(p, _read_text(p.with_suffix(".txt")).strip()) for p in images]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None


def _metadata_items(root: Path) -> list[tuple[Path, str]]:
    items = []
    metadata = root / "metadata.jsonl"
    for number, line in enumerate(_read_text(metadata).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not {"file_name", "text"} <= set(record):
            raise DataError(f'{metadata} line {number}: needs {{"file_name": ..., "text": ...}}')
        for key in ("file_name", "text"):
            if not isinstance(record[key], str):
                raise DataError(f"{metadata} line {number}: {key!r} must be a string, got {record[key]!r}")
        items.append((root / record["file_name"], record["text"]))
    return items


def collate(batch):
    pixels, captions, indices = zip(*batch, strict=True)
    return (None if pixels[0] is None else torch.stack(pixels)), list(captions), torch.tensor(indices)


def per_sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """Noise and timestep of a sample depend on (seed, step, sample) only, not on how many processes run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 10_007 + index)


def drop_captions(captions: list[str], indices: torch.Tensor, proportion: float, seed: int, step: int) -> list[str]:
    """Each caption replaced by ``""`` with probability ``proportion``, decided by (seed, step, sample) alone."""
    if proportion <= 0.0:
        return captions
    draws = [torch.rand((), generator=per_sample_generator(seed + 1, step, index)).item() for index in indices.tolist()]
    return ["" if draw < proportion else caption for caption, draw in zip(captions, draws, strict=True)]


def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir = Path(args.output_dir)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, resuming=checkpoint is not None, overwrite=args.overwrite_output_dir)
    identity = run_identity(args, RUN_IDENTITY)
    if checkpoint is not None:
        check_run_identity(checkpoint, identity)
        if checkpoint_step(checkpoint) > args.max_train_steps:  # it would save that later state as asked for
            raise UsageError(
                f"{checkpoint} is past --max_train_steps {args.max_train_steps}: resume with at least "
                f"{checkpoint_step(checkpoint)} steps, or from an earlier checkpoint"
            )
    inputs = {"--share_factors": args.share_factors, "--instance_data_dir": args.instance_data_dir}
    if args.overwrite_output_dir:
        check_inputs_survive(output_dir, OUTPUTS, inputs)
    if args.push_to_hub:  # the upload comes after the whole training
        check_online_for_upload(args.hub_model_id or output_dir.name)
    dataset = CaptionedImages(args.instance_data_dir, args.resolution)  # data errors before any model work
    accelerator = make_accelerator(args, output_dir)
    check_whole_global_batches(len(dataset), args.train_batch_size, accelerator.num_processes, "images")
    checkpoint_trainable_parameters_only(accelerator)  # not the frozen transformer: 24 GB at FLUX.1 size
    set_seed(args.seed)

    # The frozen models in the mixed-precision dtype, on the accelerator (diffusers' weight_dtype).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = ShareFluxPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    multiple = pipe.vae_scale_factor * 2  # latents are packed in 2 x 2 patches
    if args.resolution % multiple:
        raise UsageError(f"--resolution must be a multiple of {multiple} for this model, got {args.resolution}")
    pipe.to(accelerator.device)
    if args.share_factors:
        pipe.load_share_factors(args.share_factors)  # refuses factors that do not fit this transformer
        share = pipe.share
        if args.fine_tune_style:
            share.factors.style_index(args.style_name)  # names the styles held when it is not one of them
        elif args.style_name in share.style_names:
            raise StyleError(
                f"a style named {args.style_name!r} already exists in {args.share_factors} "
                "(--fine_tune_style trains it further)"
            )
    else:
        share = pipe.new_share_subspace(
            target_modules=_target_modules(pipe.transformer, args.target_modules),
            config=ShareConfig(rank=args.rank, pseudo_rank=args.pseudo_rank),
        )
    if args.overwrite_output_dir:  # after every check the model and factors make: a refused run deletes nothing
        clear_outputs(accelerator, output_dir, OUTPUTS, inputs)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    if args.fine_tune_style:
        trainables = attach_style_cores(share.layers, share.factors, args.style_name)
    else:
        trainables = attach_trainable(
            share.layers, args.pseudo_rank, phi=args.phi, coefficients_only=args.coefficients_only, seed=args.seed
        )
    for module in trainables.values():
        # Trained in float32 whatever the frozen weights' dtype (diffusers' cast_training_params): autocast
        # runs the forward in weight_dtype, the optimizer updates float32 values (and fp16's scaler needs them).
        module.to(torch.float32)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    trained = count_parameters(trainables)
    rank = share.factors.config.pseudo_rank if args.fine_tune_style else args.pseudo_rank
    logger.info(
        "trainable parameters: %s on %d layers (a LoRA of rank %d on them: %s)",
        f"{trained:,}",
        len(trainables),
        rank,
        f"{lora_parameter_count({name: share.layers[name] for name in trainables}, rank):,}",
    )
    cache, idle = None, []
    if args.cache_latents:
        cache = _cache_inputs(pipe, dataset, args, accelerator)
        dataset.load_pixels = False
        # Validation still needs the VAE and text encoders: they wait on the CPU and come back for it.
        idle = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
        for module in idle:
            module.to("cpu")
        free_memory()

    parameters = [p for module in trainables.values() for p in module.parameters() if p.requires_grad]
    logger.info(
        "frozen models: %s on %s; trained factors: %s",
        _dtype_names(p for p in pipe.transformer.parameters() if not p.requires_grad),
        accelerator.device,
        _dtype_names(parameters),
    )
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.0)
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffle(len(dataset), args.seed),
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )
    scheduler = make_lr_scheduler(
        args.lr_scheduler, optimizer, args.lr_warmup_steps, args.max_train_steps, accelerator.num_processes
    )
    transformer, optimizer, loader, scheduler = accelerator.prepare(pipe.transformer, optimizer, loader, scheduler)
    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers("train_share_flux", config=vars(args))

    step = 0 if checkpoint is None else load_checkpoint(accelerator, checkpoint)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    progress = tqdm(total=args.max_train_steps, initial=step, desc="steps", disable=not accelerator.is_main_process)
    while step < args.max_train_steps:
        epoch = step // max(steps_per_epoch, 1)
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        skip = (step % max(steps_per_epoch, 1)) * args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for pixels, captions, indices in batches:
            with accelerator.accumulate(transformer):
                loss = _batch_loss(pipe, transformer, pixels, captions, indices, args, step, cache)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = _clip_gradients(accelerator, trainables, args.max_grad_norm, step + 1)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                progress.update(1)
                logs = {"loss": accelerator.gather(loss.detach()[None]).mean().item(), "lr": scheduler.get_last_lr()[0]}
                progress.set_postfix(**logs)
                logger.debug("step %d: loss %.9g, gradient norm %.4g", step, logs["loss"], grad_norm)
                accelerator.log({**logs, "grad_norm": grad_norm}, step=step)
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit, {"run": identity})
                if args.validation_steps and step % args.validation_steps == 0:
                    _validate(pipe, args, accelerator, step, idle)
                if step >= args.max_train_steps:
                    break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        source = {"trained_from": str(args.instance_data_dir), "steps": step, "images": len(dataset)}
        factors_dir = output_dir / "factors"
        if args.fine_tune_style:
            cores = trained_cores(share.layers)
            detach_trainable(share.layers)
            share.replace_style(args.style_name, cores, source)
            outcome = "fine-tuned"
        else:
            adapter = trained_adapter(share.layers, source=source)
            detach_trainable(share.layers)
            share.merge(adapter, args.style_name)
            outcome = f"merged (relative error {share.factors.style_error(args.style_name):.2e})"
        pipe.save_share_factors(factors_dir)
        logger.info("style %r %s; factors saved to %s", args.style_name, outcome, factors_dir)
        # The style as saved (merged into k directions, or fine-tuned), not the factors as trained.
        _validate(pipe, args, accelerator, step, idle, style=args.style_name, name="final")
        if args.push_to_hub:
            pipe.push_share_factors_to_hub(args.hub_model_id or output_dir.name)
    del transformer, optimizer, loader, scheduler  # the DDP wrapper must go before the process group (end_training)
    end_training(accelerator)
    return 0


def _clip_gradients(accelerator, trainables: dict[str, torch.nn.Module], max_norm: float, step: int) -> float:
    """The gradient norm of the trained factors before clipping (clipped to ``max_norm`` when it is > 0).

    Raises:
        NonFiniteGradientError: a NaN or infinite gradient, naming the first layer and factor that has one,
            before the optimizer step could write it into the factors. Not under fp16, whose loss scaler
            overflows on purpose now and then: it skips that step and lowers the scale.
    """
    parameters = [p for module in trainables.values() for p in module.parameters() if p.requires_grad]
    scaled = getattr(accelerator, "scaler", None) is not None
    norm = None
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)  # unscales fp16 gradients first
    elif scaled:
        accelerator.unscale_gradients()
    if norm is None:  # no clipping, or a plugin that does not report the norm
        grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros(())
    norm = float(norm)
    if not math.isfinite(norm) and not scaled:
        where = next(
            (
                f"{layer}.{name}"
                for layer, module in trainables.items()
                for name, parameter in module.named_parameters()
                if parameter.grad is not None and not bool(parameter.grad.isfinite().all())
            ),
            "the gradient norm only",
        )
        raise NonFiniteGradientError(
            f"step {step}: the gradient is not finite ({where}); stopped before the step, no factors saved. "
            "Try a lower --learning_rate, or --mixed_precision no"
        )
    return norm


def _batch_loss(
    pipe, transformer, pixels, captions, indices, args, step, cache: EncodedData | None = None
) -> torch.Tensor:
    """Mean flow-matching loss over the batch, each sample with its own seeded noise and timestep.

    ``cache`` (``--cache_latents``) stands in for the VAE and text encoders; the result is the same either way.
    """
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    generators = [per_sample_generator(args.seed, step, index) for index in indices.tolist()]
    # Each sample's VAE draw comes from its own generator, before that generator draws noise and timestep.
    if cache is None:
        latents = encode_images(pipe, pixels, generators)
    else:
        latents = sample_latents(pipe.vae, cache.posteriors[indices.cpu()].to(device), generators)
    captions = drop_captions(captions, indices, args.proportion_empty_prompts, args.seed, step)
    if cache is None:
        embeds, pooled, text_ids = encode_captions(pipe, captions, args.max_sequence_length)
    else:
        embeds, pooled, text_ids = cache.captions(captions)
    latents, embeds, pooled, text_ids = (t.to(device, dtype) for t in (latents, embeds, pooled, text_ids))
    losses = []
    for row, generator in enumerate(generators):
        losses.append(
            flow_matching_loss(
                transformer,
                latents[row : row + 1],
                embeds[row : row + 1],
                pooled[row : row + 1],
                text_ids,
                args.guidance_scale,
                args.weighting_scheme,
                generator,
            )
        )
    return torch.stack(losses).mean()


def _cache_inputs(pipe, dataset: CaptionedImages, args, accelerator) -> EncodedData:
    """``--cache_latents``: the VAE posteriors of every image and the embeddings of every caption (and of
    the empty prompt when ``--proportion_empty_prompts`` may ask for it).

    Every process encodes the whole data set: its share of each epoch changes with the shuffle.
    """
    posteriors = []
    chunks = torch.arange(len(dataset)).split(args.train_batch_size)
    for chunk in tqdm(chunks, desc="caching latents", disable=not accelerator.is_main_process):
        pixels = torch.stack([dataset[index][0] for index in chunk.tolist()])  # (b, 3, R, R)
        posteriors.append(encode_posteriors(pipe, pixels).cpu())  # (b, 2c, R / s, R / s)
    captions = [caption for _, caption in dataset.items]
    if args.proportion_empty_prompts > 0:
        captions.append("")
    return EncodedData(
        torch.cat(posteriors), CaptionEmbeddings(pipe, captions, args.max_sequence_length, args.train_batch_size)
    )


def _target_modules(transformer, value: str) -> str:
    """The regex of ``--target_modules`` (a preset name or a regex); refuses one that selects no linear."""
    targets = FLUX_TARGET_PRESETS.get(value, value)
    try:
        found = find_targets(transformer, targets)
    except re.error as error:
        raise ShapeMismatchError(f"--target_modules {value!r} is not a valid regex ({error})") from None
    if not found:
        raise ShapeMismatchError(
            f"--target_modules {value!r} selects no linear layer of the transformer "
            f"(presets: {', '.join(FLUX_TARGET_PRESETS)}, or a regex matching whole module names)"
        )
    return targets


def _dtype_names(tensors) -> str:
    return ", ".join(sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors}))


def _validate(
    pipe, args, accelerator, step: int, idle: list, style: str | None = None, name: str | None = None
) -> None:
    """Images of ``--validation_prompt``, ``validation/<name>-<n>.png`` (name: ``step-<step>``): with the factors
    as trained so far (``style`` None, during training), or with the stored ``style`` (after the merge). ``idle``
    models (off the accelerator under ``--cache_latents``) come onto it for the call and go back after."""
    if not args.validation_prompt or not accelerator.is_main_process:
        return
    name = name or f"step-{step:06d}"
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    # autocast: the float32 factors being trained meet weight_dtype activations, as in training
    with offload_models(*idle, device=accelerator.device, offload=bool(idle)), accelerator.autocast(), torch.no_grad():
        images = pipe(
            prompt=[args.validation_prompt] * args.num_validation_images,
            style=style,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            max_sequence_length=args.max_sequence_length,
        ).images
    for number, image in enumerate(images):
        image.save(folder / f"{name}-{number}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tag = "validation" if style is None else f"validation/{name}"
            tracker.writer.add_images(tag, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")


def cli(argv=None) -> int:
    """``main`` as the command line runs it: a refusal of bad input is one ``error:`` line and exit status 1."""
    try:
        return main(argv)
    except (UsageError, DataError, ShareError) as error:  # bad input: one line, before any training step
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        destroy_process_group()  # on success end_training did it; not on an error


if __name__ == "__main__":
    sys.exit(cli())
