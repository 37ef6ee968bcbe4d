"""The project's own small world: a tiny instruction-tuned T5, its tokenizer, and one LoRA
expert per upstream task, built by `scripts/build_zoo.py` because Flan-T5 cannot be
downloaded everywhere the project must run."""
from lorahub_compeft.zoo.tasks import (ZooTask, format_prompt, generate, get_task, load_tasks,
                                       task_names)

__all__ = ["ZooTask", "format_prompt", "generate", "get_task", "load_tasks", "task_names"]
