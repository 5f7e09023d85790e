"""training/train_share_classifier.py end to end on tiny backbones: Share, the baselines, processes, resume, errors."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from classifier_helpers import write_keyword_tasks, write_shape_tasks, write_tiny_bert, write_tiny_mobilenet
from launch_helpers import CPU_ENV, accelerate_launch, run_cli_in_process, script_module
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from share_diffusers.continual import TaskDataError, accuracy_table, load_task, matrix_summary
from share_diffusers.core import load_factors

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "training" / "train_share_classifier.py"
# Small sizes for the options each method uses (a method refuses the others).
LORA = ["--lora_rank", "4", "--lora_alpha", "8"]
SMALL = {"share": ["--rank", "8", "--pseudo_rank", "4", "--phi", "4", *LORA], "lora": LORA, "full": []}
FAST = ["--learning_rate", "3e-2", "--head_learning_rate", "3e-2", "--seed", "1"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    return {"bert": write_tiny_bert(root / "bert"), **write_keyword_tasks(root / "tasks")}


def task_args(setup, names):
    return [item for name in names for item in ("--task", f"{name}={setup[name]}")]


def run(model, tasks, out, *extra, method="share", processes: int = 1, launch: bool = True, check: bool = True):
    prefix = accelerate_launch(processes) if launch else [sys.executable]
    command = [*prefix, str(SCRIPT), "--model_name_or_path", str(model), *tasks, "--output_dir", str(out)]
    command += ["--method", method, *SMALL[method], *FAST, *map(str, extra)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=CPU_ENV, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _script():
    """training/train_share_classifier.py as a module, to call its ``main`` or ``cli`` in this process."""
    return script_module(SCRIPT)


def _arguments(setup, names, out, *extra) -> list[str]:
    """The command line on the tiny BERT (method share unless ``extra`` says otherwise)."""
    method = next((extra[i + 1] for i, flag in enumerate(extra) if flag == "--method"), "share")
    sizes = [] if {"--rank", "--phi", "--coefficients_only"} & set(map(str, extra)) else SMALL[method]
    arguments = ["--model_name_or_path", setup["bert"], *task_args(setup, names), "--output_dir", out]
    return [str(argument) for argument in [*arguments, *sizes, *FAST, *extra]]


@pytest.fixture
def train(text, monkeypatch):
    """``train(names, out, *extra)``: the script's ``main`` in this process on the CPU (no interpreter start)."""

    def train(names, out, *extra) -> None:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's process-wide state, as its tests do
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as CPU_ENV gives the launched runs: a busy machine slowed 2 threads 50x
        try:
            assert _script().main(_arguments(text, names, out, *extra)) == 0
        finally:
            torch.set_num_threads(threads)
            AcceleratorState._reset_state(reset_partial_state=True)

    return train


class ModelLoaded(Exception):
    """Raised by the backbone loader under ``forbid_loading``: the script got past its checks."""


@pytest.fixture
def forbid_loading(monkeypatch):
    """The script may not load its backbone: refusals of the command line come before any model work."""

    def load(*args, **kwargs):
        raise ModelLoaded("the backbone was loaded")

    monkeypatch.setattr(_script(), "load_backbone", load)


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
    # a decaying schedule: accelerate steps it once per process for each optimizer step (lr 1, 2/3, 1/3 x 3e-2)
    common = ("--max_train_steps", 3, "--lr_scheduler", "linear")
    run(text["bert"], tasks, tmp_path / "one", *common, "--train_batch_size", 4)
    run(text["bert"], tasks, tmp_path / "two", *common, "--train_batch_size", 2, processes=2)
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
    log = run(text["bert"], tasks, full, "--max_train_steps", 6, "--checkpointing_steps", 3).stderr
    # Each checkpoint holds what its task trains (task 1: the PEFT LoRA and the head; task 2: the temporary
    # factors and the head), none of the frozen backbone.
    trained = [int(count.replace(",", "")) for count in re.findall(r"task \d/2 '\w+': ([\d,]+) trainable", log)]
    assert len(trained) == 2
    for step, count in ((3, trained[0]), (6, trained[0]), (9, trained[1]), (12, trained[1])):
        with safe_open(str(full / f"checkpoint-{step}" / "model.safetensors"), framework="pt") as stored:
            assert sum(math.prod(stored.get_slice(key).get_shape()) for key in stored.keys()) == count, step
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
    # Each task's first and last losses, the resumed task's first ones from before the cut.
    assert results(full)["losses"] == results(cut)["losses"]


def test_baselines_and_the_comparison_report(text, tmp_path):
    tasks = task_args(text, ["colors", "animals"])
    for method in ("share", "lora", "full"):
        run(text["bert"], tasks, tmp_path / method, "--max_train_steps", 10, method=method, launch=False)
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
        (
            lambda d: (d / "animals" / "train.jsonl").write_text('{"text": 5, "label": "cat"}\n'),
            "train.jsonl line 1: 'text' must be a string, got 5",
        ),
        (
            lambda d: (d / "animals" / "test.jsonl").write_text('{"text": "a cat", "label": null}\n'),
            "test.jsonl line 1: 'label' must be a name or a number, got None",
        ),
        (
            lambda d: (d / "animals" / "train.jsonl").write_bytes(
                '{"text": "caf\u00e9", "label": "cat"}\n'.encode("latin-1")
            ),
            "train.jsonl is not UTF-8 text",
        ),
    ],
    ids=["no-folder", "no-test-split", "no-label", "unseen-label", "not-json", "text-not-str", "null-label", "latin-1"],
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
    arguments = ["--model_name_or_path", text["bert"], *tasks, "--output_dir", tmp_path / "out", *SMALL["share"], *FAST]
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


def test_forgetting_is_measured_from_each_task_best_accuracy():
    """Chaudhry et al.'s forgetting: a task's best accuracy in the earlier rows minus its final accuracy."""
    matrix = [[0.5], [0.9, 0.8], [0.6, 0.8, 0.7]]
    assert matrix_summary(matrix)["forgetting"] == pytest.approx(0.3)
    assert matrix_summary(matrix)["bwt"] == pytest.approx(((0.6 - 0.5) + (0.8 - 0.8)) / 2)  # BWT: from the diagonal
    lines = accuracy_table(matrix, ["a", "b", "c"]).splitlines()
    assert lines[3].startswith("| b | 90.0 ↑40.0 | 80.0 |  |")
    assert lines[4].startswith("| c | 60.0 ↓30.0 | 80.0 | 70.0 |")  # a fell from its best, 90, not from 50

    from share_diffusers.continual.report import forgetting

    assert forgetting(matrix) == pytest.approx([0.3, 0.0])


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


def test_every_epoch_sees_every_example_under_gradient_accumulation(text, tmp_path, monkeypatch, train):
    """48 examples in batches of 5 make 10 batches an epoch; accumulating 3, accelerate steps the optimizer after
    batches 3, 6, 9 and at the end of the loader (10): 4 steps an epoch, so 12 steps are 3 whole epochs."""
    module, epoch, seen = _script(), [None], {}

    class RecordingShuffle(module.EpochShuffle):
        def __iter__(self):
            epoch[0] = self.epoch
            return super().__iter__()

    def recording_loader(dataset, *, collate_fn, **kwargs):
        def collate(examples):  # the batches training takes (evaluation calls the encoder directly)
            seen.setdefault(epoch[0], []).extend(text for text, _ in examples)
            return collate_fn(examples)

        return DataLoader(dataset, collate_fn=collate, **kwargs)

    monkeypatch.setattr(module, "EpochShuffle", RecordingShuffle)
    monkeypatch.setattr(module, "DataLoader", recording_loader)
    extra = ("--max_train_steps", 12, "--train_batch_size", 5, "--gradient_accumulation_steps", 3)
    train(["colors"], tmp_path / "out", *extra)
    lines = (Path(text["colors"]) / "train.jsonl").read_text().splitlines()
    examples = sorted(json.loads(line)["text"] for line in lines)
    assert len(examples) == 48
    assert {number: sorted(texts) for number, texts in seen.items()} == {0: examples, 1: examples, 2: examples}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "lora", "--rank", 8], "--method lora does not use --rank; drop them"),
        (
            ["--method", "full", "--phi", 2, "--lora_rank", 4],
            "--method full does not use --phi, --lora_rank; drop them",
        ),
        (["--method", "lora", "--coefficients_only"], "--method lora does not use --coefficients_only; drop them"),
        (["--coefficients_only", "--phi", 2], "--coefficients_only trains no temporary basis directions; drop --phi"),
        (["--lr_scheduler", "exponential"], "--lr_scheduler 'exponential' is not one of linear, cosine, "),
        (["--resume_from_checkpoint", "/no/such/checkpoint-3"], "/no/such/checkpoint-3: no such checkpoint folder"),
        (["--checkpoints_total_limit", 1], "--checkpoints_total_limit needs --checkpointing_steps"),
        (["--eval_batch_size", 0], "--eval_batch_size must be at least 1, got 0"),
        (["--max_length", 0], "--max_length must be at least 1, got 0"),
        (["--max_eval_samples", 0], "--max_eval_samples must be at least 1, got 0"),
        (["--head_learning_rate", -1], "--head_learning_rate must be a finite number above 0, got -1.0"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number above 0, got nan"),
        (["--seed", -1], "--seed must be from 0 to 4294967295, got -1"),
        (["--method", "lora", "--lora_rank", 0], "--lora_rank must be at least 1, got 0"),
        (["--method", "lora", "--lora_alpha", "-2"], "--lora_alpha must be a finite number above 0, got -2.0"),
    ],
    ids=[
        "lora-rank",
        "full-phi-lora-rank",
        "lora-coefficients-only",
        "coefficients-phi",
        "scheduler",
        "resume",
        "limit",
        "eval-batch-0",
        "max-length-0",
        "max-eval-samples-0",
        "negative-head-lr",
        "nan-lr",
        "negative-seed",
        "lora-rank-0",
        "negative-lora-alpha",
    ],
)
def test_bad_arguments_are_refused_before_any_model_loads(text, tmp_path, extra, message, capsys, forbid_loading):
    returncode, stderr = run_cli_in_process(SCRIPT, _arguments(text, ["colors"], tmp_path / "out", *extra), capsys)
    assert returncode == 1 and stderr.strip().splitlines() == [stderr.strip()], stderr
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_every_image_of_a_task_is_checked_before_training(tmp_path, broken):
    """Only the first training and test image were opened: a later one failed in the middle of training."""
    folder = write_shape_tasks(tmp_path / "tasks", count=6)["side"]
    last = folder / "images" / "train-5.png"
    last.unlink() if broken == "missing" else last.write_bytes(b"not a png")
    with pytest.raises(TaskDataError, match=rf"^task 'side': {re.escape(str(last))} is not a readable image \("):
        load_task("side", folder)
    assert len(load_task("side", write_shape_tasks(tmp_path / "good", count=6)["side"]).train) == 6


def test_tasks_that_do_not_fill_whole_global_batches_are_refused(text, tmp_path, capsys, monkeypatch, forbid_loading):
    """2 processes of 5: accelerate would repeat 2 of the 48 examples at the end of every epoch; refused before
    the backbone loads. Batches of 4 (global 8) divide 48."""

    class TwoProcesses:
        def __init__(self, accelerator):
            self._accelerator, self.num_processes = accelerator, 2

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

    module = _script()
    make_accelerator = module.make_accelerator
    monkeypatch.setattr(module, "make_accelerator", lambda *a: TwoProcesses(make_accelerator(*a)))
    arguments = _arguments(text, ["colors", "animals"], tmp_path / "out", "--train_batch_size", 5)
    returncode, stderr = run_cli_in_process(SCRIPT, arguments, capsys)
    assert returncode == 1
    assert (
        "error: 48 training examples of 'colors' do not fill whole global batches of 10 (--train_batch_size 5 x 2 "
        "processes): accelerate would repeat 2 of them at the end of every epoch" in stderr
    )
    with pytest.raises(ModelLoaded):  # past the check
        run_cli_in_process(SCRIPT, _arguments(text, ["colors"], tmp_path / "out", "--train_batch_size", 4), capsys)


@pytest.mark.parametrize(
    ("backbone", "extra", "message"),
    [
        ("missing", [], "missing: no transformers model loads from it ("),
        ("mobilenet", [], "mobilenet is a mobilenet_v2 model, which takes pixel_values; text tasks need a backbone"),
        ("bert", ["--target_modules", "query", "qeury"], "--target_modules 'qeury' matches no linear or convolution"),
    ],
    ids=["missing", "vision-backbone-for-text", "misspelt-target"],
)
def test_a_backbone_that_does_not_fit_is_refused_before_the_overwrite_deletes_anything(
    text, tmp_path, capsys, backbone, extra, message
):
    models = {"bert": text["bert"], "missing": tmp_path / "missing", "mobilenet": tmp_path / "mobilenet"}
    if backbone == "mobilenet":
        write_tiny_mobilenet(models["mobilenet"])
    out = tmp_path / "out"
    (out / "after-task-1").mkdir(parents=True)  # an earlier run's, which --overwrite_output_dir would delete
    arguments = _arguments(text, ["colors"], out, "--overwrite_output_dir", *extra)
    arguments[arguments.index("--model_name_or_path") + 1] = str(models[backbone])
    returncode, stderr = run_cli_in_process(SCRIPT, arguments, capsys)
    last = stderr.strip().splitlines()[-1]
    assert returncode == 1 and last.startswith("error: --") and message in last, stderr
    assert (out / "after-task-1").is_dir()


def test_share_targets_selecting_a_3x3_convolution_are_refused_before_training(tmp_path, capsys):
    """The first task's PEFT LoRA trained on the 3x3 stem convolution, then its merge into the subspace failed
    ("PEFT LoRA: layer ... has lora_A (4, 3, 3, 3)"): the task's whole training lost. A LoRA may train it."""
    model = write_tiny_mobilenet(tmp_path / "mobilenet")
    folders = write_shape_tasks(tmp_path / "tasks", count=8)
    tasks = [item for name, folder in folders.items() for item in ("--task", f"{name}={folder}")]
    targets = ["--target_modules", "first_conv.convolution", "expand_1x1.convolution"]
    arguments = ["--model_name_or_path", model, *tasks, "--output_dir", tmp_path / "out", *SMALL["share"], *targets]
    returncode, stderr = run_cli_in_process(SCRIPT, [*map(str, arguments), "--resolution", "32"], capsys)
    assert returncode == 1 and "task 1/2" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: --target_modules 'first_conv.convolution' selects 'conv_stem.first_conv.convolution', a 3x3 Conv2d "
        "(groups=1, padding=(1, 1)); Share holds only linears and 1x1 convolutions (groups=1, no padding): choose "
        "targets that select only those"
    )
    assert not (tmp_path / "out" / "after-task-1").exists()


def test_a_non_empty_output_dir_is_refused_and_overwrite_replaces_the_earlier_run(text, tmp_path, capsys, train):
    out = tmp_path / "out"
    for folder in ("after-task-1", "after-task-2", "checkpoint-6", "checkpoint-9.tmp"):
        (out / folder).mkdir(parents=True)
        (out / folder / "stale.txt").write_text("from an earlier run")
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("the user's")
    arguments = _arguments(text, ["colors"], out, "--max_train_steps", 2)
    returncode, stderr = run_cli_in_process(SCRIPT, arguments, capsys)
    assert returncode == 1
    assert f"error: --output_dir {out} is not empty (it holds 'after-task-1' and more); pass --overwrite" in stderr
    # A one-task run over a two-task one: no after-task-2 of the earlier run is left beside the new results.
    train(["colors"], out, "--max_train_steps", 2, "--overwrite_output_dir")
    assert sorted(path.name for path in out.iterdir()) == ["after-task-1", "notes.txt", "results.json", "results.md"]
    assert not (out / "after-task-1" / "stale.txt").exists()
    assert results(out)["tasks"] == ["colors"] and len(results(out)["rows"]) == 1


def test_a_checkpoint_of_other_settings_is_refused_and_the_process_group_torn_down(text, tmp_path, capsys):
    """Resuming from a checkpoint that lacks what this run trains is one error line; the command line then
    destroys the process group although end_training never ran (a one-process gloo group stands in for a
    multi-process run's, whose teardown at interpreter exit can hang)."""
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    save_file({"head.weight": torch.zeros(2, 2)}, checkpoint / "model.safetensors")
    arguments = _arguments(
        text, ["colors"], tmp_path / "out", "--max_train_steps", 6, "--resume_from_checkpoint", "latest"
    )
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        returncode, stderr = run_cli_in_process(SCRIPT, arguments, capsys)
        assert returncode == 1
        last = stderr.strip().splitlines()[-1]
        assert re.search(rf"^error: {checkpoint} lacks (\d+) of the \1 tensors this run trains, e\.g\. '", last), last
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_checkpoint_saved_with_another_step_count_is_refused(text, tmp_path, capsys, forbid_loading):
    """The task a global step belongs to follows from --max_train_steps: a checkpoint saved under 6 steps a task,
    resumed under 4, would continue task 1's tensors as task 2's."""
    from share_diffusers.training_utils import CHECKPOINT_EXTRAS

    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_EXTRAS).write_text(json.dumps({"task_losses": [], "run": {"max_train_steps": 6}}))
    arguments = _arguments(
        text, ["colors"], tmp_path / "out", "--max_train_steps", 4, "--resume_from_checkpoint", "latest"
    )
    returncode, stderr = run_cli_in_process(SCRIPT, arguments, capsys)
    assert returncode == 1
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: {checkpoint} was saved by a run with --max_train_steps 6, this run has 4: its trained tensors"
        )
    )


def test_evaluate_takes_fewer_test_examples_and_refuses_other_task_names(text, tmp_path, capsys, train):
    """--max_eval_samples was overwritten by the saved run's (None); task names other than the saved ones gave
    a state-dict traceback from the heads."""
    out = tmp_path / "out"
    train(["colors", "animals"], out, "--max_train_steps", 2)
    saved = out / "after-task-2"

    def evaluate(*extra) -> tuple[int, str, str]:
        capsys.readouterr()
        returncode = _script().cli(["--evaluate", str(saved), *map(str, extra)])
        captured = capsys.readouterr()
        return returncode, captured.err, captured.out

    returncode, _, printed = evaluate()
    full = json.loads(printed.strip().splitlines()[-1])["accuracy"]
    returncode, _, printed = evaluate("--max_eval_samples", 3)
    few = json.loads(printed.strip().splitlines()[-1])["accuracy"]
    assert returncode == 0 and all(round(value * 3) == value * 3 for value in few)  # thirds: 3 examples each
    assert few != full  # measured: [0.67, 0.67] on 3 examples, [0.5, 0.33] on all 24
    returncode, stderr, _ = evaluate("--task", f"a={text['colors']}", "--task", f"b={text['animals']}")
    assert returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        f"error: --task names ['a', 'b'] are not the tasks {saved} learned, in order: ['colors', 'animals']; give "
        "NAME=DIR for each of them, or leave --task out to use the saved folders"
    )
