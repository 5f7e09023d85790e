"""Train the two judges of generated pictures on real Fashion-MNIST photos (a few minutes on a CPU).

    python training/train_judges.py --output_dir share_diffusers/fashion/assets/judges

``classes.safetensors`` names the garment whatever its look (trained on the photos in every demo
look); ``styles.safetensors`` names the look (plain or a demo style). Both are scored on the real test
split, per look, into ``judges.json``. Augmentation (flips, 2-pixel shifts, a little noise) makes them
robust to the small defects of generated pictures. Deterministic from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from share_diffusers.fashion.data import CLASS_NAMES, FashionDataError, load_fashion_mnist
from share_diffusers.fashion.judges import Judge, save_judge
from share_diffusers.fashion.styles import JUDGE_CLASSES, apply_looks, apply_style

logger = logging.getLogger("train_judges")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST .gz IDX files (default: Debian's)")
    parser.add_argument("--train_limit", type=int, default=None, help="first N training photos only")
    parser.add_argument("--test_limit", type=int, default=None)
    parser.add_argument("--class_epochs", type=int, default=5)
    parser.add_argument("--style_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, shifts of up to 2 pixels, Gaussian noise of std up to 0.05."""
    batch = len(images)
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()  # one shift per batch keeps it cheap
    images = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    noise = torch.randn(images.shape, generator=generator) * torch.rand(batch, 1, 1, 1, generator=generator) * 0.05
    return (images + noise).clamp(0.0, 1.0)


# Plain photos are drawn more often than each style: the class judge is scored on the plain test split.
LOOK_WEIGHTS = torch.tensor([0.4] + [0.6 / (len(JUDGE_CLASSES) - 1)] * (len(JUDGE_CLASSES) - 1))


def styled_batch(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image in a look drawn from ``JUDGE_CLASSES`` by ``LOOK_WEIGHTS``; returns (images, look indices)."""
    looks = torch.multinomial(LOOK_WEIGHTS, len(images), replacement=True, generator=generator)
    return apply_looks(images, looks), looks


def train(judge: Judge, images, labels, target: str, epochs: int, args) -> None:
    """``target``: ``class`` (labels are garments) or ``style`` (labels are the drawn looks)."""
    generator = torch.Generator().manual_seed(args.seed + (0 if target == "class" else 1))
    torch.manual_seed(args.seed)
    steps = epochs * (len(images) // args.batch_size)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=steps)
    judge.train()
    progress = tqdm(total=steps, desc=f"{target} judge")
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            rows = order[start : start + args.batch_size]
            styled, looks = styled_batch(images[rows], generator)
            logits = judge(augment(styled, generator))
            loss = nn.functional.cross_entropy(logits, labels[rows] if target == "class" else looks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    judge.eval()


def scores(class_judge: Judge, style_judge: Judge, images, labels) -> dict:
    """Per look: the class judge's accuracy and the style judge's accuracy on the test photos in that look."""
    report = {}
    for index, look in enumerate(JUDGE_CLASSES):
        styled = apply_style(images, look)
        report[look] = {
            "class_accuracy": round((class_judge.predict(styled) == labels).float().mean().item(), 4),
            "style_accuracy": round((style_judge.predict(styled) == index).float().mean().item(), 4),
        }
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images, labels = load_fashion_mnist("train", args.data_dir, args.train_limit)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir, args.test_limit)
    torch.manual_seed(args.seed)
    class_judge = Judge(CLASS_NAMES)
    train(class_judge, images, labels, "class", args.class_epochs, args)
    torch.manual_seed(args.seed + 1)
    style_judge = Judge(JUDGE_CLASSES)
    train(style_judge, images, labels, "style", args.style_epochs, args)

    output_dir = Path(args.output_dir)
    save_judge(class_judge, output_dir / "classes.safetensors")
    save_judge(style_judge, output_dir / "styles.safetensors")
    report = {"test_photos": len(test_images), "per_look": scores(class_judge, style_judge, test_images, test_labels)}
    report["options"] = {key: value for key, value in vars(args).items() if key not in ("output_dir", "data_dir")}
    (output_dir / "judges.json").write_text(json.dumps(report, indent=1) + "\n")
    for look, row in report["per_look"].items():
        logger.info("%-9s class judge %.3f  style judge %.3f", look, row["class_accuracy"], row["style_accuracy"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FashionDataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
