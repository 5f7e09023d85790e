"""Tiny transformers backbones and small keyword tasks for the continual-classifier tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

# Each task: label -> words that give the label away; sentences mix them with filler words.
KEYWORD_TASKS = {
    "colors": {"red": ["red", "crimson", "scarlet"], "blue": ["blue", "navy", "azure"]},
    "animals": {"cat": ["cat", "kitten", "meow"], "dog": ["dog", "puppy", "bark"], "bird": ["bird", "wing", "nest"]},
    "weather": {"sun": ["sunny", "sunshine", "hot"], "rain": ["rain", "storm", "wet"]},
}
FILLER = "the a of and to in is it that on was for with as at by this from".split()


def write_keyword_tasks(root: Path, train: int = 48, test: int = 24, seed: int = 0) -> dict[str, Path]:
    """Three small text tasks as ``train.jsonl`` / ``test.jsonl`` folders; returns name -> folder."""
    rng = random.Random(seed)
    folders = {}
    for name, labels in KEYWORD_TASKS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", train), ("test", test)):
            lines = []
            for number in range(count):
                label = sorted(labels)[number % len(labels)]
                words = rng.sample(FILLER, 5) + [rng.choice(labels[label])]
                rng.shuffle(words)
                lines.append(json.dumps({"text": " ".join(words), "label": label}))
            rng.shuffle(lines)
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        folders[name] = folder
    return folders


def write_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer whose vocabulary is the keyword tasks' words.

    The vocabulary is written, not trained: the ``tokenizers`` trainer orders tokens of equal frequency by
    hash-map iteration, which Rust seeds per process, so each test run got other token ids for the same
    words and the classifier tests learned more or less in 40 steps (one fell to chance in a full run).
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = FILLER + [w for labels in KEYWORD_TASKS.values() for group in labels.values() for w in group]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(special + sorted({word.lower() for word in words}))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_tiny_mobilenet(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import MobileNetV2Config, MobileNetV2Model

    torch.manual_seed(seed)
    config = MobileNetV2Config(depth_multiplier=0.35, image_size=32, tf_padding=False, layer_norm_eps=1e-5)
    MobileNetV2Model(config).save_pretrained(path)
    return path


def write_shape_tasks(root: Path, count: int = 16, seed: int = 0) -> dict[str, Path]:
    """Two small image tasks: bright square left/right; horizontal/vertical bar."""
    rng = np.random.default_rng(seed)
    folders = {}
    for name, draw in (("side", _side), ("bars", _bars)):
        folder = root / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            lines = []
            for number in range(count):
                label = ("a", "b")[number % 2]
                pixels = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
                draw(pixels, label)
                relative = f"images/{split}-{number}.png"
                Image.fromarray(pixels).save(folder / relative)
                lines.append(json.dumps({"image": relative, "label": label}))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        folders[name] = folder
    return folders


def _side(pixels, label):
    columns = slice(2, 14) if label == "a" else slice(18, 30)
    pixels[8:24, columns] = 250


def _bars(pixels, label):
    if label == "a":
        pixels[14:18, :] = 250
    else:
        pixels[:, 14:18] = 250
