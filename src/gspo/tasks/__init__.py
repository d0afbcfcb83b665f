"""Tasks (prompts + held-out rows + rewards), reward resolution and dataset loading."""

from gspo.tasks.base import DataCursor, Row, Task
from gspo.tasks.registry import build_task

__all__ = ["DataCursor", "Row", "Task", "build_task"]
