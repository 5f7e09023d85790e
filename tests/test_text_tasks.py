"""training/prepare_text_tasks.py: deduplication before the split, so that no test text is a training text."""

from __future__ import annotations

import json
from pathlib import Path

from launch_helpers import script_module

PREPARE = script_module(Path(__file__).resolve().parent.parent / "training" / "prepare_text_tasks.py")


def read_split(path: Path) -> list[tuple[str, str]]:
    return [(row["text"], row["label"]) for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def test_repeats_kept_once_and_conflicting_labels_dropped():
    examples = [
        ("Markets fall", "business"),
        ("Rain tomorrow", "weather"),
        ("markets   FALL", "business"),  # the same text: case and spacing differ
        ("Cars are great", "positive"),
        ("cars are great", "negative"),  # rated twice, two answers: no right label
        ("Cars are great", "positive"),
    ]
    kept, repeats, conflicting = PREPARE.deduplicated(examples)
    assert kept == [("Markets fall", "business"), ("Rain tomorrow", "weather")]
    assert (repeats, conflicting) == (1, 3)


def test_written_splits_share_no_text(tmp_path, capsys):
    # Each text three times: an undeduplicated 80/20 split puts copies on both sides.
    examples = [(f"text number {i}", f"label{i % 3}") for i in range(40)] * 3
    PREPARE.write_task(tmp_path / "task", examples, max_train=1000, max_test=1000, seed=0)
    train, test = (read_split(tmp_path / "task" / f"{split}.jsonl") for split in ("train", "test"))
    assert len(train) + len(test) == 40
    assert not {PREPARE.normalized(t) for t, _ in train} & {PREPARE.normalized(t) for t, _ in test}
    assert "80 repeated and 0 conflicting-label examples dropped" in capsys.readouterr().out
