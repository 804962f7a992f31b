"""Prompt text of the phase-two tasks: instructions, histories written out as text, chat formatting.

User-LLM puts the history into user embeddings, so its prompt is only the instruction and a short question.
The TextPrompt baselines (and the long+short AR50TP10 variant) also list the most recent events as text;
that list is what makes their prompts tens of times longer.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

INSTRUCTIONS = {
    "nextitem": "Predict the next {noun} the user will choose. Answer with its title only.",
    "favgenre": "Name the user's favorite {noun} genre. Answer with the genre only.",
    "reviewg": "Write the review this user would give the {noun} with the given rating.",
}
QUESTIONS = {"nextitem": "Next {noun}?", "favgenre": "Favorite genre?"}


def history_text(events: Sequence[str], noun: str) -> str:
    """The history as one line of text, oldest first (what the TextPrompt baselines read)."""
    return f"Past {noun}s, oldest first: " + "; ".join(events) + "." if events else ""


def format_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, user_message: str) -> str:
    """The prompt string: the tokenizer's chat template when it has one (instruction as the system turn, so
    no default system prompt is added), else plain ``instruction / message / Answer:`` lines."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{instruction}\n{user_message}\nAnswer:"
