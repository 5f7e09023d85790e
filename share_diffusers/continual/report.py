"""The accuracy matrix of a continual run, in the layout of the paper's Table 1, and its plot.

``matrix[t][i]`` is the test accuracy (0..1) on task ``i`` after learning tasks ``0..t`` (row ``t`` has
``t + 1`` entries). Forgetting of task ``i`` at row ``t`` is its best accuracy so far minus its accuracy now,
``max(matrix[l][i] for i <= l < t) - matrix[t][i]`` (Chaudhry et al., 2018: against the historical peak,
not against the accuracy when the task was learned, so a task that first gained and then lost counts what
it lost); backward transfer (BWT) is the mean over earlier tasks of ``matrix[-1][i] - matrix[i][i]``
(negative = forgetting).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Changes smaller than this (accuracy points) are shown as "=": test sets of a few hundred examples
# cannot resolve them.
MARK_THRESHOLD_POINTS = 1.0


def peak_accuracy(matrix: Sequence[Sequence[float]], t: int, i: int) -> float:
    """Task ``i``'s best accuracy in the rows before row ``t`` (from the row that learned it, ``i < t``)."""
    return max(matrix[row][i] for row in range(i, t))


def forgetting(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Each earlier task's forgetting after the last row: its peak over the rows before minus its final accuracy
    (negative when it ends above every earlier row)."""
    t = len(matrix) - 1
    return [peak_accuracy(matrix, t, i) - matrix[t][i] for i in range(t)]


def matrix_summary(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """``average`` accuracy after the last task, ``bwt`` and worst ``forgetting`` (all in 0..1)."""
    last = matrix[-1]
    earlier = [last[i] - matrix[i][i] for i in range(len(last) - 1)]
    return {
        "average": sum(last) / len(last),
        "bwt": sum(earlier) / len(earlier) if earlier else 0.0,
        "forgetting": max(forgetting(matrix) + [0.0]) + 0.0,  # + 0.0: never "-0.0"
    }


def accuracy_table(
    matrix: Sequence[Sequence[float]], tasks: Sequence[str], secondary: Sequence[Sequence[float]] | None = None
) -> str:
    """Markdown: rows "after task t", columns "task i"; ↓ marks forgetting and ↑ a new best (points against
    task i's best accuracy in the rows before), with average accuracy and BWT per row.
    ``secondary`` (same layout as ``matrix``) is shown in parentheses after each cell."""
    header = "| after learning | " + " | ".join(tasks) + " | average | BWT |"
    lines = [header, "|" + " --- |" * (len(tasks) + 3)]
    for t, row in enumerate(matrix):
        cells = []
        for i in range(len(tasks)):
            if i >= len(row):
                cells.append("")
                continue
            cell = f"{100 * row[i]:.1f}"
            if i < t:
                change = 100 * (row[i] - peak_accuracy(matrix, t, i))
                if change <= -MARK_THRESHOLD_POINTS:
                    cell += f" ↓{-change:.1f}"
                elif change >= MARK_THRESHOLD_POINTS:
                    cell += f" ↑{change:.1f}"
            if secondary is not None:
                cell += f" ({100 * secondary[t][i]:.1f})"
            cells.append(cell)
        summary = matrix_summary(matrix[: t + 1])
        bwt = f"{100 * summary['bwt']:+.1f}" if t else ""
        lines.append(f"| {tasks[t]} | " + " | ".join(cells) + f" | {100 * summary['average']:.1f} | {bwt} |")
    return "\n".join(lines)


def plot_matrices(matrices: dict[str, Sequence[Sequence[float]]], tasks: Sequence[str], path: str | Path) -> Path:
    """One panel per task: its accuracy after each later task, a line per method. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), sharey=True, squeeze=False)
    for i, (axis, task) in enumerate(zip(axes[0], tasks, strict=True)):
        for method, matrix in matrices.items():
            steps = list(range(i, len(matrix)))
            axis.plot(steps, [100 * matrix[t][i] for t in steps], marker="o", label=method)
        axis.set_title(f"task {i + 1}: {task}")
        axis.set_xticks(range(len(tasks)), [f"after {t + 1}" for t in range(len(tasks))], fontsize=8)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
