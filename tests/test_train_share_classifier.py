"""training/train_share_classifier.py end to end on tiny backbones: Share, the baselines, processes, resume, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from classifier_helpers import write_keyword_tasks, write_shape_tasks, write_tiny_bert, write_tiny_mobilenet
from launch_helpers import CPU_ENV, accelerate_launch, run_cli_in_process
from safetensors.torch import load_file

from share_diffusers.continual import accuracy_table, matrix_summary
from share_diffusers.core import load_factors

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "training" / "train_share_classifier.py"
SMALL = ["--rank", "8", "--pseudo_rank", "4", "--phi", "4", "--lora_rank", "4", "--lora_alpha", "8"]
FAST = ["--learning_rate", "3e-2", "--head_learning_rate", "3e-2", "--seed", "1"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    return {"bert": write_tiny_bert(root / "bert"), **write_keyword_tasks(root / "tasks")}


def task_args(setup, names):
    return [item for name in names for item in ("--task", f"{name}={setup[name]}")]


def run(model, tasks, out, *extra, processes: int = 1, launch: bool = True, check: bool = True):
    prefix = accelerate_launch(processes) if launch else [sys.executable]
    command = [*prefix, str(SCRIPT), "--model_name_or_path", str(model), *tasks, "--output_dir", str(out)]
    command += [*SMALL, *FAST, *map(str, extra)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=CPU_ENV, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def evaluate_saved(folder: Path) -> list[float]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--evaluate", str(folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["accuracy"]


def test_share_learns_three_tasks_keeps_earlier_ones_and_reloads(text, tmp_path):
    out = tmp_path / "share"
    run(text["bert"], task_args(text, ["colors", "animals", "weather"]), out, "--max_train_steps", 40)
    record = results(out)
    assert [len(row) for row in record["rows"]] == [1, 2, 3]
    for task, (first, last) in zip(record["tasks"], record["losses"], strict=True):
        assert last < 0.8 * first, (task, first, last)
    assert record["rows"][0][0] > 0.6  # two balanced labels: chance is 0.5
    assert "| after learning | colors | animals | weather | average | BWT |" in (out / "results.md").read_text()

    # The tasks are styles of one checkpoint; the heads are saved beside the factors.
    factors = load_factors(out / "after-task-3" / "factors")
    assert factors.style_names == ["colors", "animals", "weather"]
    assert set(load_file(out / "after-task-3" / "heads.safetensors")) >= {"animals.weight", "weather.bias"}
    assert evaluate_saved(out / "after-task-3") == record["rows"][-1]

    # Learning later tasks moves an earlier task's update by no more than the errors the core reports.
    before = load_factors(out / "after-task-1" / "factors")
    errors_now, errors_then = factors.layer_errors("colors"), before.layer_errors("colors")
    for layer in factors.layers:
        old, new = before.delta_weight(layer, "colors"), factors.delta_weight(layer, "colors")
        drift = float((new - old).norm() / old.norm())
        bound = errors_now[layer] + errors_then[layer]
        assert drift <= bound + 1e-5, (layer, drift, bound)


def test_two_processes_train_what_one_process_trains(text, tmp_path):
    tasks = task_args(text, ["colors", "animals"])
    run(text["bert"], tasks, tmp_path / "one", "--max_train_steps", 3, "--train_batch_size", 4)
    run(text["bert"], tasks, tmp_path / "two", "--max_train_steps", 3, "--train_batch_size", 2, processes=2)
    one = load_factors(tmp_path / "one" / "after-task-2" / "factors")
    two = load_factors(tmp_path / "two" / "after-task-2" / "factors")
    for name in one.layers:
        for style in ("colors", "animals"):
            a, b = one.delta_weight(name, style), two.delta_weight(name, style)
            # gloo sums the two halves of the batch in another order than one process: float32 round-off
            assert float((a - b).norm() / a.norm()) < 1e-3, (name, style)
    heads_one = load_file(tmp_path / "one" / "after-task-2" / "heads.safetensors")
    heads_two = load_file(tmp_path / "two" / "after-task-2" / "heads.safetensors")
    for key in heads_one:
        assert torch.allclose(heads_one[key], heads_two[key], rtol=1e-3, atol=1e-5), key


@pytest.mark.parametrize("killed_after", [9, 6], ids=["mid-task", "task-boundary-before-snapshot"])
def test_resume_from_latest_ends_where_an_uninterrupted_run_ends(text, tmp_path, killed_after):
    tasks = task_args(text, ["colors", "animals"])
    full = tmp_path / "full"
    run(text["bert"], tasks, full, "--max_train_steps", 6, "--checkpointing_steps", 3)
    # What a run killed right after saving checkpoint-<killed_after> leaves on disk.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for path in cut.iterdir():
        if path.name.startswith("checkpoint-"):
            gone = int(path.name.split("-")[1]) > killed_after
        elif path.name.startswith("after-task-"):
            gone = 6 * int(path.name.split("-")[2]) >= killed_after  # written after that task's last checkpoint
        else:
            gone = path.suffix in (".json", ".md")
        if gone:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(
        text["bert"],
        tasks,
        cut,
        "--max_train_steps",
        6,
        "--checkpointing_steps",
        3,
        "--resume_from_checkpoint",
        "latest",
    )
    a = load_factors(full / "after-task-2" / "factors")
    b = load_factors(cut / "after-task-2" / "factors")
    for name in a.layers:
        for style in ("colors", "animals"):
            assert torch.equal(a.delta_weight(name, style), b.delta_weight(name, style)), (name, style)
    assert results(full)["rows"] == results(cut)["rows"]


def test_baselines_and_the_comparison_report(text, tmp_path):
    tasks = task_args(text, ["colors", "animals"])
    for method in ("share", "lora", "full"):
        run(text["bert"], tasks, tmp_path / method, "--max_train_steps", 10, "--method", method, launch=False)
    lora, full = results(tmp_path / "lora"), results(tmp_path / "full")
    assert lora["rows"][1][0] == lora["rows"][0][0]  # independent adapters: nothing to forget
    backbone = sum(t.numel() for t in load_file(tmp_path / "full" / "after-task-2" / "backbone.safetensors").values())
    heads = sum(t.numel() for t in load_file(tmp_path / "full" / "after-task-2" / "heads.safetensors").values())
    assert full["stored_numbers"] == backbone + heads
    assert full["trainable"][0] > 10 * lora["trainable"][0]
    adapters = load_file(tmp_path / "lora" / "after-task-2" / "adapters" / "animals.safetensors")
    assert lora["stored_numbers"] == heads + 2 * sum(t.numel() for t in adapters.values())
    assert evaluate_saved(tmp_path / "lora" / "after-task-2") == lora["rows"][-1]
    assert evaluate_saved(tmp_path / "full" / "after-task-2") == full["rows"][-1]

    report = tmp_path / "report" / "continual"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "training" / "continual_report.py"),
            *(str(tmp_path / m) for m in ("share", "lora", "full")),
            "-o",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    markdown = report.with_suffix(".md").read_text()
    assert markdown.count("| after learning | colors | animals |") == 3
    assert "sequential full fine-tuning" in markdown and report.with_suffix(".png").stat().st_size > 10_000


def test_vision_backbone_with_share_on_1x1_convolutions(tmp_path):
    model = write_tiny_mobilenet(tmp_path / "mobilenet")
    folders = write_shape_tasks(tmp_path / "tasks")
    tasks = [item for name, folder in folders.items() for item in ("--task", f"{name}={folder}")]
    out = tmp_path / "out"
    run(model, tasks, out, "--max_train_steps", 20, "--resolution", 32, "--train_batch_size", 8, launch=False)
    record = results(out)
    assert all(last < first for first, last in record["losses"]), record["losses"]
    factors = load_factors(out / "after-task-2" / "factors")
    assert factors.style_names == ["side", "bars"]
    assert all(name.endswith(("expand_1x1.convolution", "reduce_1x1.convolution")) for name in factors.layers)
    assert evaluate_saved(out / "after-task-2") == record["rows"][-1]


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: shutil.rmtree(d / "animals"), "animals/ is not a folder"),
        (lambda d: (d / "animals" / "test.jsonl").unlink(), "test.jsonl is missing"),
        (lambda d: (d / "animals" / "train.jsonl").write_text('{"text": "x"}\n'), "train.jsonl line 1: needs"),
        (lambda d: (d / "animals" / "test.jsonl").write_text('{"text": "x", "label": "fish"}\n'), "never seen"),
        (lambda d: (d / "animals" / "train.jsonl").write_text("{oops\n"), "train.jsonl line 1: not JSON"),
    ],
    ids=["no-folder", "no-test-split", "no-label", "unseen-label", "not-json"],
)
def test_bad_task_data_fails_before_any_model_work(text, tmp_path, break_it, message, capsys):
    shutil.copytree(Path(text["animals"]).parent, tmp_path / "tasks")
    break_it(tmp_path / "tasks")
    tasks = [
        "--task",
        f"colors={tmp_path / 'tasks' / 'colors'}",
        "--task",
        f"animals={tmp_path / 'tasks' / 'animals'}/",
    ]
    arguments = ["--model_name_or_path", text["bert"], *tasks, "--output_dir", tmp_path / "out", *SMALL, *FAST]
    returncode, stderr = run_cli_in_process(SCRIPT, arguments, capsys)
    assert returncode == 1 and message in stderr.strip().splitlines()[-1], stderr
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out" / "after-task-1").exists()


def test_a_refusal_on_the_command_line_is_one_error_line(text, tmp_path):
    """The one run of the script in its own interpreter for a refusal: the ``error:`` line, status 1, no
    traceback (the other refusals run its ``cli`` in process)."""
    tasks = ["--task", f"colors={text['colors']}", "--task", f"animals={tmp_path / 'missing'}"]
    result = run(text["bert"], tasks, tmp_path / "out", launch=False, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "is not a folder" in result.stderr
    assert not (tmp_path / "out" / "after-task-1").exists()


def test_accuracy_table_marks_forgetting_and_transfer():
    matrix = [[0.9], [0.8, 0.7], [0.95, 0.7, 0.6]]
    summary = matrix_summary(matrix)
    assert summary["bwt"] == pytest.approx(((0.95 - 0.9) + (0.7 - 0.7)) / 2)
    assert summary["average"] == pytest.approx((0.95 + 0.7 + 0.6) / 3)
    assert summary["forgetting"] == pytest.approx(0.0)
    assert matrix_summary(matrix[:2])["forgetting"] == pytest.approx(0.1)
    lines = accuracy_table(matrix, ["a", "b", "c"]).splitlines()
    assert lines[3].startswith("| b | 80.0 ↓10.0 | 70.0 |  | 75.0 | -10.0 |")
    assert lines[4].startswith("| c | 95.0 ↑5.0 | 70.0 | 60.0 |")
