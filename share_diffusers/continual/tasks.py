"""One classification task on disk: ``train.jsonl`` and ``test.jsonl`` in a folder.

Each line is ``{"text": "...", "label": "sport"}`` (text) or ``{"image": "images/0001.png", "label":
"sneaker"}`` (image path relative to the folder). Labels are names; their sorted set in the training
split defines the head's outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class TaskDataError(ValueError):
    """A task folder cannot be used; raised before any model work."""


@dataclass
class TaskData:
    """A task's examples: ``train`` / ``test`` are lists of ``(input, label index)``.

    ``input`` is the text, or the image's absolute path; ``modality`` is ``"text"`` or ``"image"``.
    """

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    modality: str

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def load_task(name: str, folder: str | Path, max_test: int | None = None) -> TaskData:
    """Read and check a task folder; ``max_test`` keeps the first N test examples (files are pre-shuffled)."""
    root = Path(folder)
    if not root.is_dir():
        raise TaskDataError(f"task {name!r}: {folder} is not a folder")
    train_records = _read_split(root / "train.jsonl", name)
    test_records = _read_split(root / "test.jsonl", name)
    modality = _modality(train_records + test_records, root, name)
    labels = sorted({record["label"] for record in train_records})
    if len(labels) < 2:
        raise TaskDataError(f"task {name!r}: {root / 'train.jsonl'} has {len(labels)} label(s); a classifier needs 2+")
    unseen = sorted({record["label"] for record in test_records} - set(labels))
    if unseen:
        raise TaskDataError(f"task {name!r}: test labels never seen in training: {unseen[:5]}")
    index = {label: number for number, label in enumerate(labels)}

    def examples(records):
        if modality == "text":
            return [(record["text"], index[record["label"]]) for record in records]
        return [(str(root / record["image"]), index[record["label"]]) for record in records]

    train, test = examples(train_records), examples(test_records)
    test = test[:max_test] if max_test else test
    if modality == "image":  # every one: fail before training, not at step 900
        _check_images([path for path, _ in train + test], name)
    return TaskData(name, labels, train, test, modality)


def _read_split(path: Path, name: str) -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"task {name!r}: {path} is missing (one JSON object per line: input and 'label')")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise TaskDataError(f"{path} is not UTF-8 text ({error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskDataError(f"{path} line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or "label" not in record or not ({"text", "image"} & set(record)):
            raise TaskDataError(f'{path} line {number}: needs {{"text" or "image": ..., "label": ...}}')
        for key in ("text", "image"):
            if key in record and not isinstance(record[key], str):
                raise TaskDataError(f"{path} line {number}: {key!r} must be a string, got {record[key]!r}")
        if record["label"] is None or isinstance(record["label"], (dict, list)):
            raise TaskDataError(f"{path} line {number}: 'label' must be a name or a number, got {record['label']!r}")
        record["label"] = str(record["label"])
        records.append(record)
    if not records:
        raise TaskDataError(f"task {name!r}: {path} holds no examples")
    return records


def _modality(records: list[dict], root: Path, name: str) -> str:
    kinds = {"text" if "text" in record else "image" for record in records}
    if len(kinds) > 1:
        raise TaskDataError(f"task {name!r}: {root} mixes text and image examples")
    return kinds.pop()


def _check_images(paths: list[str], name: str) -> None:
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise TaskDataError(f"task {name!r}: {path} is not a readable image ({error})") from None
