"""Train the embedded demo model: a small Flux (FLUX.1's architecture) on Fashion-MNIST, on a CPU.

    accelerate launch training/train_tiny_flux.py --output_dir share_diffusers/fashion/assets/fashion-flux

Two phases, each with a progress bar:
1. the VAE (32x32 RGB <-> 16x16x4) learns to reconstruct the photos, and the demo styles'
   transformations of them (``share_diffusers/fashion/styles.py``): like FLUX.1's VAE it must encode
   any picture, not only what the base model draws; then its shift and scale are set so that the
   latents of the photos have mean 0 and standard deviation 1;
2. the transformer learns rectified flow (diffusers' Flux objective, logit-normal timesteps) on the
   plain photos' latents with the prompt "a photo of a <class>", 10% of prompts dropped to the empty
   one, and an EMA of its weights is what is saved.

The tiny CLIP and T5 encoders stay frozen at their seeded random weights. The output folder is an
ordinary diffusers pipeline (``ShareFluxPipeline.from_pretrained`` loads it) plus ``training.json``
(options, losses and times). Deterministic from ``--seed`` for a given number of processes.

``--checkpointing_steps N`` saves a resumable state every N transformer steps under
``OUTPUT_DIR-state/checkpoint-<step>`` (the finished VAE included, so a resumed run skips phase 1);
``--resume_from_checkpoint latest`` continues from the newest and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import FluxPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from share_diffusers.fashion.data import CLASS_NAMES, FashionDataError, load_fashion_mnist, prompt_for
from share_diffusers.fashion.model import MAX_SEQUENCE_LENGTH, build_fashion_flux_components
from share_diffusers.fashion.styles import JUDGE_CLASSES, apply_looks
from share_diffusers.flux_training import flow_matching_loss
from share_diffusers.training_utils import (
    LR_SCHEDULERS,
    EpochShuffle,
    UsageError,
    check_at_least,
    check_common_arguments,
    check_positive_rates,
    find_checkpoint,
    load_checkpoint,
    make_accelerator,
    save_checkpoint,
)

logger = logging.getLogger("train_tiny_flux")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", required=True, help="the diffusers pipeline folder to write")
    add("--data_dir", default=None, help="Fashion-MNIST .gz IDX files (default: Debian's dataset-fashion-mnist)")
    add("--train_limit", type=int, default=None, help="use only the first N training photos (quick runs)")
    add("--seed", type=int, default=0)
    add("--vae_steps", type=int, default=800)
    add("--vae_batch_size", type=int, default=64)
    add("--vae_learning_rate", type=float, default=1e-3)
    add("--kl_weight", type=float, default=1e-5, help="weight of the KL term per latent value")
    add("--max_train_steps", type=int, default=2000, help="transformer steps")
    add("--train_batch_size", type=int, default=64)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=5e-4)
    add("--lr_scheduler", default="constant_with_warmup", help=f"one of {', '.join(LR_SCHEDULERS)}")
    add("--lr_warmup_steps", type=int, default=100)
    add("--caption_dropout", type=float, default=0.1, help="share of prompts replaced by the empty prompt")
    add("--ema_decay", type=float, default=0.999)
    add("--weighting_scheme", default="logit_normal", choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"])
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    add("--report_to", default=None, help="tensorboard, wandb, ... (accelerate trackers)")
    add("--checkpointing_steps", type=int, default=0, help="resumable state every N transformer steps (0: never)")
    add("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in OUTPUT_DIR-state")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Every refusal the command line alone decides, before the data or a model loads.

    Raises:
        UsageError: the first bad value, naming the flag.
    """
    check_common_arguments(args)
    check_at_least(args, vae_steps=1, vae_batch_size=1)
    if args.train_limit is not None:
        check_at_least(args, train_limit=1)
    check_positive_rates(args, "vae_learning_rate")
    if not (math.isfinite(args.kl_weight) and args.kl_weight >= 0):
        raise UsageError(f"--kl_weight must be a finite number, at least 0, got {args.kl_weight}")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise UsageError(f"--caption_dropout must be in [0, 1], got {args.caption_dropout}")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise UsageError(f"--ema_decay must be in [0, 1], got {args.ema_decay}")


def step_generator(seed: int, phase: int, step: int, process: int) -> torch.Generator:
    """Random draws of a step depend on (seed, phase, step, process) only: reruns repeat exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_003 + step * 101 + process)


class VAELoss(nn.Module):
    """Reconstruction MSE of a posterior sample plus ``kl_weight`` x KL per latent value (one forward,
    so that DDP sees the encoder and decoder in one graph)."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        posterior = self.vae.encode(pixels).latent_dist  # pixels (b, 3, 32, 32) in [-1, 1]
        latents = posterior.sample(generator=generator)  # (b, 4, 16, 16)
        reconstruction = self.vae.decode(latents).sample
        kl_per_value = posterior.kl().mean() / latents[0].numel()
        return nn.functional.mse_loss(reconstruction, pixels) + self.kl_weight * kl_per_value


def random_styles(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image in the look of a style drawn uniformly from ``JUDGE_CLASSES`` (plain included)."""
    return apply_looks(images, torch.randint(len(JUDGE_CLASSES), (len(images),), generator=generator))


def train_vae(accelerator, vae, images: torch.Tensor, args) -> list[float]:
    """Phase 1; returns the loss every 50 steps."""
    loss_module = VAELoss(vae, args.kl_weight)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    loader = DataLoader(
        TensorDataset(images), batch_size=args.vae_batch_size, sampler=EpochShuffle(len(images), args.seed)
    )
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=50, num_training_steps=args.vae_steps)
    loss_module, optimizer, loader, scheduler = accelerator.prepare(loss_module, optimizer, loader, scheduler)
    vae.train()
    losses, step = [], 0
    progress = tqdm(total=args.vae_steps, desc="vae", disable=not accelerator.is_main_process)
    while step < args.vae_steps:
        loader.set_epoch(step // max(len(loader), 1)) if hasattr(loader, "set_epoch") else None
        for (batch,) in loader:
            generator = step_generator(args.seed, 1, step, accelerator.process_index)
            pixels = random_styles(batch, generator) * 2.0 - 1.0
            loss = loss_module(pixels, generator)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(loss_module.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % 50 == 0 or step == args.vae_steps:
                losses.append(round(accelerator.gather(loss.detach()[None]).mean().item(), 5))
                accelerator.log({"vae_loss": losses[-1]}, step=step)
            if step >= args.vae_steps:
                break
    progress.close()
    vae.eval()
    return losses


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every photo, ``(n, 4, 16, 16)`` each."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encode", leave=False):
        posterior = vae.encode(images[start : start + batch_size].to(vae.device) * 2.0 - 1.0).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


class PromptBank:
    """The frozen text encoders' outputs for the 10 class prompts and the empty prompt (index 10)."""

    def __init__(self, pipe):
        prompts = [prompt_for(label) for label in range(len(CLASS_NAMES))] + [""]
        with torch.no_grad():
            self.embeds, self.pooled, self.text_ids = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH
            )  # (11, T, 32), (11, 32), (T, 3)
        self.empty = len(prompts) - 1

    def lookup(self, labels: torch.Tensor, dropout: float, generator: torch.Generator):
        """Prompt embeddings for ``labels`` ``(b,)``, each replaced by the empty prompt with prob. ``dropout``."""
        dropped = torch.rand(len(labels), generator=generator) < dropout
        rows = torch.where(dropped, torch.full_like(labels, self.empty), labels)
        return self.embeds[rows], self.pooled[rows], self.text_ids


def save_state(accelerator, vae, history: dict, state_dir: Path, step: int) -> None:
    """Transformer, optimizer, scheduler, EMA and RNG states (accelerate), the finished VAE and the history, in
    ``state_dir/checkpoint-<step>``, atomically (:func:`~share_diffusers.training_utils.save_checkpoint`)."""

    def write_files(folder: Path) -> None:
        vae.save_pretrained(str(folder / "vae"))
        (folder / "history.json").write_text(json.dumps(history) + "\n")

    save_checkpoint(accelerator, state_dir, step, write_files=write_files)


def restore_vae(vae, checkpoint: Path) -> dict:
    """Phase 1's result from ``checkpoint`` into ``vae`` (weights, latent shift and scale); returns the history."""
    from diffusers import AutoencoderKL

    trained = AutoencoderKL.from_pretrained(str(checkpoint / "vae"))
    vae.load_state_dict(trained.state_dict())
    vae.register_to_config(shift_factor=trained.config.shift_factor, scaling_factor=trained.config.scaling_factor)
    vae.eval()
    return json.loads((checkpoint / "history.json").read_text())


def train_transformer(
    accelerator, transformer, latent_mean, latent_std, labels, bank: PromptBank, args, checkpoints
) -> tuple[EMAModel, list[float], float]:
    """Phase 2 on standardised latents; returns (the EMA model, the loss every 50 steps, its seconds).

    ``checkpoints``: ``(vae, history, state_dir, resume_from)``; saves there every ``--checkpointing_steps``
    and, when ``resume_from`` is a checkpoint folder, continues from it."""
    vae, history, state_dir, resume_from = checkpoints
    ema = EMAModel(transformer.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, weight_decay=0.01)
    dataset = TensorDataset(latent_mean, latent_std, labels)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=EpochShuffle(len(dataset), args.seed))
    scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(transformer, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(ema)
    losses, step = [], 0
    if resume_from is not None:
        step, losses = load_checkpoint(accelerator, resume_from), list(history["loss_every_50_steps"])
    micro = step * args.gradient_accumulation_steps  # the per-batch random draws continue where they stopped
    model.train()
    steps_per_epoch = max(math.ceil(len(loader) / args.gradient_accumulation_steps), 1)
    progress = tqdm(
        total=args.max_train_steps, initial=step, desc="transformer", disable=not accelerator.is_main_process
    )
    started = time.perf_counter() - history.get("transformer_seconds", 0.0)
    while step < args.max_train_steps:
        loader.set_epoch(step // steps_per_epoch) if hasattr(loader, "set_epoch") else None
        skip = (step % steps_per_epoch) * args.gradient_accumulation_steps
        for mean, std, batch_labels in accelerator.skip_first_batches(loader, skip) if skip else loader:
            generator = step_generator(args.seed, 2, micro, accelerator.process_index)
            micro += 1
            latents = mean + std * torch.randn(mean.shape, generator=generator)  # a posterior sample, standardised
            embeds, pooled, text_ids = bank.lookup(batch_labels.cpu(), args.caption_dropout, generator)
            with accelerator.accumulate(model):
                loss = flow_matching_loss(
                    model,
                    latents.to(accelerator.device),
                    embeds.to(accelerator.device),
                    pooled.to(accelerator.device),
                    text_ids.to(accelerator.device),
                    weighting_scheme=args.weighting_scheme,
                    generator=generator,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            ema.step(transformer.parameters())
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % 50 == 0 or step == args.max_train_steps:
                losses.append(round(accelerator.gather(loss.detach()[None]).mean().item(), 5))
                accelerator.log({"loss": losses[-1], "lr": scheduler.get_last_lr()[0]}, step=step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < args.max_train_steps:
                history.update(loss_every_50_steps=losses, transformer_seconds=time.perf_counter() - started)
                save_state(accelerator, vae, history, state_dir, step)
            if step >= args.max_train_steps:
                break
    progress.close()
    return ema, losses, time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir = Path(args.output_dir)
    state_dir = output_dir.parent / f"{output_dir.name}-state"  # logs and checkpoints
    accelerator = make_accelerator(args, state_dir)
    set_seed(args.seed)
    images, labels = load_fashion_mnist("train", args.data_dir, args.train_limit)  # data errors before model work
    logger.info("%d training photos of %d classes", len(images), len(CLASS_NAMES))
    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers("train_tiny_flux", config=vars(args))

    components = build_fashion_flux_components(args.seed)
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    vae = pipe.vae
    resume_from = find_checkpoint(args.resume_from_checkpoint, state_dir)
    if resume_from is None:
        started = time.perf_counter()
        vae_losses = train_vae(accelerator, vae, images, args)
        history = {"vae_loss_every_50_steps": vae_losses, "vae_seconds": time.perf_counter() - started}
        accelerator.free_memory()  # phase 2 is another training: its checkpoints hold only its own objects
        mean, std = encode_posteriors(vae, images)
        shift = mean.mean().item()
        scale = 1.0 / math.sqrt(((mean - shift) ** 2).mean().item() + (std**2).mean().item())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    else:
        history = restore_vae(vae, resume_from)
        mean, std = encode_posteriors(vae, images)
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    logger.info("latent shift %.4f, scale %.4f", shift, scale)
    vae.requires_grad_(False)

    bank = PromptBank(pipe)
    ema, losses, transformer_seconds = train_transformer(
        accelerator,
        pipe.transformer,
        (mean - shift) * scale,
        std * scale,
        labels,
        bank,
        args,
        (vae, history, state_dir, resume_from),
    )
    vae_seconds = history["vae_seconds"]

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(pipe.transformer)
        ema.copy_to(transformer.parameters())
        transformer.eval()
        pipe.save_pretrained(str(output_dir))
        summary = {
            "options": {key: value for key, value in vars(args).items() if key not in ("output_dir", "data_dir")},
            "photos": len(images),
            "vae_seconds": round(vae_seconds, 1),
            "transformer_seconds": round(transformer_seconds, 1),
            "processes": accelerator.num_processes,
            "vae_loss_every_50_steps": history["vae_loss_every_50_steps"],
            "loss_every_50_steps": losses,
            "latent_shift": shift,
            "latent_scale": scale,
        }
        (output_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        logger.info(
            "pipeline saved to %s (VAE %.0f s, transformer %.0f s)", output_dir, vae_seconds, transformer_seconds
        )
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """``main`` as the command line runs it: a refusal of bad input is one ``error:`` line and exit status 1."""
    try:
        return main(argv)
    except (UsageError, FashionDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
