"""Task kinds: one `Task` class each, selected by `task._target_` in conf/task/*.yaml (qgplm.tasks.base)."""

from qgplm.tasks.base import Evaluator, Task, TaskConfig, TaskDataModule, build_task, task_class

__all__ = ["Evaluator", "Task", "TaskConfig", "TaskDataModule", "build_task", "task_class"]
