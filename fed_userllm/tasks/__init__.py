"""Phase-two tasks (NextItem, FavGenre, ReviewG): prompts, training batches and evaluation."""

from fed_userllm.tasks.prompts import format_prompt, history_text
from fed_userllm.tasks.tasks import (
    TASKS,
    FavGenre,
    NextItem,
    ReviewG,
    Task,
    evaluate,
    list_ranks,
    rank,
    to_device,
)

__all__ = [
    "TASKS", "FavGenre", "NextItem", "ReviewG", "Task", "evaluate", "format_prompt", "history_text",
    "list_ranks", "rank", "to_device",
]
