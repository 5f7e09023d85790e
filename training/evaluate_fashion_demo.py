"""Score the demo model and its continually learned styles with the judges; write the samples.

    python training/evaluate_fashion_demo.py --continual_dir WORK/continual --lora_dir WORK/lora \\
        --output samples/fashion-demo

Writes ``OUTPUT.md`` (targets, the continual table in the layout of the paper's Table 4, the per-style
LoRA baseline and storage), ``OUTPUT.json`` (every number) and ``OUTPUT-grid.png`` (classes x styles,
generated in one batch that mixes styles per prompt). ``WORK/continual/<style>/factors`` are the Share
checkpoints after each style (in ``--styles`` order); ``WORK/lora/<style>/factors`` one LoRA per style.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from share_diffusers.continual.report import accuracy_table, matrix_summary
from share_diffusers.fashion.data import CLASS_NAMES
from share_diffusers.fashion.evaluation import balanced_labels, generate, judge_scores
from share_diffusers.fashion.judges import load_judge
from share_diffusers.fashion.model import (
    DEMO_CALL,
    DEMO_PIPELINE_DIR,
    JUDGES_DIR,
    build_fashion_flux_components,
    load_demo_pipeline,
)
from share_diffusers.fashion.styles import STYLE_NAMES
from share_diffusers.pipeline_flux import ShareFluxPipeline


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def styled_scores(pipe, judges, style: str, per_class: int, seed: int, steps: int) -> dict:
    labels = balanced_labels(per_class)
    images = generate(pipe, labels, [style] * len(labels), seed=seed, num_inference_steps=steps)
    return judge_scores(*judges, images, labels, [style] * len(labels))


def save_grid(images: torch.Tensor, rows: list[str], columns: list[str], path: Path) -> None:
    """``images`` ``(len(rows) * len(columns), 3, H, W)``, row-major, as a labelled PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), len(columns), figsize=(1.1 * len(columns) + 1.0, 1.1 * len(rows)))
    for index, axis in enumerate(axes.flat):
        axis.imshow(images[index].permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        row, column = divmod(index, len(columns))
        if row == 0:
            axis.set_title(columns[column], fontsize=9)
        if column == 0:
            axis.set_ylabel(rows[row], fontsize=8, rotation=0, ha="right", va="center")
    figure.tight_layout(pad=0.3)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(DEMO_PIPELINE_DIR))
    parser.add_argument("--judges_dir", default=str(JUDGES_DIR))
    parser.add_argument("--continual_dir", type=Path, required=True)
    parser.add_argument("--lora_dir", type=Path, required=True)
    parser.add_argument("--styles", nargs="+", default=list(STYLE_NAMES))
    parser.add_argument("--base_per_class", type=int, default=100, help="images per class for the base model")
    parser.add_argument("--style_per_class", type=int, default=10, help="images per class for each table cell")
    parser.add_argument("--num_inference_steps", type=int, default=DEMO_CALL["num_inference_steps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True, help="writes OUTPUT.md, .json, -grid.png")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    judges = (
        load_judge(Path(args.judges_dir) / "classes.safetensors"),
        load_judge(Path(args.judges_dir) / "styles.safetensors"),
    )
    steps = args.num_inference_steps

    pipe = load_demo_pipeline(args.pipeline)
    labels = balanced_labels(args.base_per_class)
    base_images = generate(pipe, labels, None, seed=args.seed, num_inference_steps=steps)
    base = judge_scores(*judges, base_images, labels, ["plain"] * len(labels))
    predicted = judges[0].predict(base_images)
    per_class = [(predicted[i :: len(CLASS_NAMES)] == i).float().mean().item() for i in range(len(CLASS_NAMES))]
    untrained = ShareFluxPipeline(**build_fashion_flux_components(0))
    untrained.set_progress_bar_config(disable=True)
    random_labels = balanced_labels(max(args.base_per_class // 10, 1))
    random_images = generate(untrained, random_labels, None, seed=args.seed, num_inference_steps=steps)
    random_scores = judge_scores(*judges, random_images, random_labels, ["plain"] * len(random_labels))
    print(f"base: class {base['class_accuracy']:.3f} (untrained weights {random_scores['class_accuracy']:.3f})")

    lora, lora_bytes = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for style in args.styles:
            pipe.load_share_factors(args.lora_dir / style / "factors")
            lora[style] = styled_scores(pipe, judges, style, args.style_per_class, args.seed, steps)
            exported = pipe.export_style_as_lora(style, Path(workdir) / f"{style}.safetensors")
            lora_bytes[style] = exported.stat().st_size
            print(f"LoRA {style}: {lora[style]}")

    style_matrix, class_matrix = [], []
    for t, style in enumerate(args.styles):
        pipe.load_share_factors(args.continual_dir / style / "factors")
        cells = [
            styled_scores(pipe, judges, args.styles[i], args.style_per_class, args.seed, steps) for i in range(t + 1)
        ]
        style_matrix.append([cell["style_accuracy"] for cell in cells])
        class_matrix.append([cell["class_accuracy"] for cell in cells])
        print(f"after {style}: style {style_matrix[-1]} class {class_matrix[-1]}")
    share_bytes = folder_bytes(args.continual_dir / args.styles[-1] / "factors")

    pipe.load_share_factors(args.continual_dir / args.styles[-1] / "factors")
    fine_tuned = {  # styles whose coefficients were fine-tuned after their merge (train_share_flux --fine_tune_style)
        style.name: style.source["fine_tuned"].get("steps")
        for style in pipe.share_factors.styles
        if "fine_tuned" in style.source
    }
    looks = [None, *args.styles]
    grid_labels = [label for label in range(len(CLASS_NAMES)) for _ in looks]
    grid = generate(pipe, grid_labels, looks * len(CLASS_NAMES), seed=args.seed + 10_000, num_inference_steps=steps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_grid(
        grid, list(CLASS_NAMES), ["no style", *args.styles], args.output.with_name(args.output.name + "-grid.png")
    )

    results = {
        "styles": args.styles,
        "base": base,
        "base_per_class": dict(zip(CLASS_NAMES, per_class, strict=True)),
        "untrained": random_scores,
        "style_matrix": style_matrix,
        "class_matrix": class_matrix,
        "lora": lora,
        "share_bytes": share_bytes,
        "lora_bytes": lora_bytes,
        "fine_tuned_steps": fine_tuned,
        "options": {key: str(value) for key, value in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(report(results, args) + "\n")
    print(report(results, args))
    return 0


def report(results: dict, args) -> str:
    styles, base = results["styles"], results["base"]
    final = results["style_matrix"][-1]
    when_learned = [results["style_matrix"][i][i] for i in range(len(styles))]
    class_drop = max(base["class_accuracy"] - c for c in results["class_matrix"][-1])
    forgetting = 100 * matrix_summary(results["style_matrix"])["forgetting"]
    gap = max(100 * (results["lora"][s]["style_accuracy"] - final[i]) for i, s in enumerate(styles))
    total_lora = sum(results["lora_bytes"].values())
    ratio = results["share_bytes"] / total_lora

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    n_base, n_cell = 10 * args.base_per_class, 10 * args.style_per_class
    lines = [
        f"Images generated by the shipped demo model ({args.num_inference_steps} Euler steps, 32x32), scored by "
        f"the shipped judges. Base model: {n_base} images ({args.base_per_class} per class); each styled cell: "
        f"{n_cell} images ({args.style_per_class} per class).",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| class judge names the prompted class >= 70% (chance 10%) | {100 * base['class_accuracy']:.1f}% "
        f"(untrained weights: {100 * results['untrained']['class_accuracy']:.1f}%) "
        f"| {verdict(base['class_accuracy'] >= 0.70)} |",
        f"| style judge names the requested style >= 80% (after all styles) | worst {100 * min(final):.1f}% "
        f"| {verdict(min(final) >= 0.80)} |",
        f"| class accuracy under a style drops <= 15 points | worst drop {100 * class_drop:.1f} points "
        f"| {verdict(class_drop <= 0.15)} |",
        f"| no earlier style falls > 5 points after later ones | worst forgetting {forgetting:.1f} points "
        f"| {verdict(forgetting <= 5.0)} |",
        f"| Share within 5 points of one LoRA per style | worst gap {gap:+.1f} points | {verdict(gap <= 5.0)} |",
        "",
        "**Continual styles (paper's Table 4 layout).** Style judge's score (%) of images generated with style i "
        "(columns) after learning styles 1..t (rows), class accuracy in parentheses; ↓ forgetting / ↑ backward "
        "transfer against the score when the style was learned.",
        "",
        accuracy_table(results["style_matrix"], styles, secondary=results["class_matrix"]),
        "",
        "| | " + " | ".join(styles) + " | stored |",
        "|" + " --- |" * (len(styles) + 2),
        "| one LoRA per style (non-continual) | "
        + " | ".join(
            f"{100 * results['lora'][s]['style_accuracy']:.1f} ({100 * results['lora'][s]['class_accuracy']:.1f})"
            for s in styles
        )
        + f" | {total_lora / 1024:.0f} KiB ({len(styles)} files) |",
        "| Share, after all styles | "
        + " | ".join(f"{100 * final[i]:.1f} ({100 * results['class_matrix'][-1][i]:.1f})" for i in range(len(styles)))
        + f" | {results['share_bytes'] / 1024:.0f} KiB (one checkpoint, {ratio:.2f}x the LoRAs) |",
        "",
        (
            "Coefficients fine-tuned in the checkpoint's bases after learning (paper Step 3, `--fine_tune_style`): "
            + ", ".join(f"{name} ({steps} steps)" for name, steps in results["fine_tuned_steps"].items())
            + ". "
            if results.get("fine_tuned_steps")
            else ""
        )
        + "Scores when each style was learned: "
        + ", ".join(f"{s} {100 * v:.1f}" for s, v in zip(styles, when_learned, strict=True))
        + ".",
        "Base model, class judge accuracy per class: "
        + ", ".join(f"{name} {100 * value:.0f}" for name, value in results["base_per_class"].items())
        + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
