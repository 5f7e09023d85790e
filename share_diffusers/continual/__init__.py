"""Continual classification with Share on transformers backbones (text and vision).

The pieces ``training/train_share_classifier.py`` is made of: task data (``tasks``), a backbone with
one head per task (``classifier``) and the accuracy-matrix report in the paper's Table 1 layout
(``report``). The Share maths is the same core that backs the Flux pipeline.
"""

from .classifier import ContinualClassifier, default_targets, load_backbone
from .report import accuracy_table, matrix_summary, plot_matrices
from .tasks import TaskData, TaskDataError, load_task

__all__ = [
    "ContinualClassifier",
    "default_targets",
    "load_backbone",
    "accuracy_table",
    "matrix_summary",
    "plot_matrices",
    "TaskData",
    "TaskDataError",
    "load_task",
]
