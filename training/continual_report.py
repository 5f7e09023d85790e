"""Compare continual runs of train_share_classifier.py: one table in the paper's Table 1 layout per
method, a summary table (accuracy, backward transfer, parameters, storage) and a plot.

    python training/continual_report.py out/share out/lora out/full -o samples/continual-text
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from share_diffusers.continual.report import accuracy_table, plot_matrices

METHOD_TITLES = {
    "share": "Share (one subspace, a core per task)",
    "lora": "one LoRA per task (non-continual baseline)",
    "full": "sequential full fine-tuning",
}


def comparison(results: list[dict]) -> str:
    lines = [
        "| method | average accuracy after the last task | BWT | worst forgetting | trained parameters per task "
        "| stored after the last task |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        summary = result["summary"]
        trained = sum(result["trainable"]) / len(result["trainable"])
        lines.append(
            f"| {METHOD_TITLES.get(result['method'], result['method'])} | {100 * summary['average']:.1f} "
            f"| {100 * summary['bwt']:+.1f} | {100 * summary['forgetting']:.1f} | {trained:,.0f} "
            f"| {result['stored_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each run (holding results.json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="writes OUTPUT.md and OUTPUT.png")
    parser.add_argument("--note", default=None, help="a paragraph under the first one (setup, test-set sizes)")
    args = parser.parse_args()
    results = [json.loads((run / "results.json").read_text()) for run in args.runs]
    tasks = results[0]["tasks"]
    if any(result["tasks"] != tasks for result in results):
        raise SystemExit("error: the runs learned different task sequences")
    parts = [
        "Accuracy (%) on each task (columns) after learning each task (rows); ↓ forgetting and ↑ a new best in "
        "points against the task's best accuracy after any earlier row; worst forgetting: the largest drop of a "
        "task from that best to its accuracy after the last task.",
        *(["", args.note] if args.note else []),
        "",
        comparison(results),
    ]
    for result in results:
        parts += [
            "",
            f"**{METHOD_TITLES.get(result['method'], result['method'])}**",
            "",
            accuracy_table(result["rows"], tasks),
        ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    plot_matrices({r["method"]: r["rows"] for r in results}, tasks, args.output.with_suffix(".png"))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
