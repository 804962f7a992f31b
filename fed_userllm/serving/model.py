"""The served model: a UserLLM, loaded once and frozen, that takes the encoder states a phone computed.

A phone runs the exported user encoder and sends only its per-event outputs ``[T, state_dim]`` (float32, taken
before the projection) with the sha256 of the encoder weights that produced them. The server applies the
trained projection and cross-attention / soft prompt of a UserLLM run to those states and generates.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from fed_userllm.data.sequences import UserSequences
from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.models import load_pretrained
from fed_userllm.models.constrained import TitleTrie, rank_titles
from fed_userllm.models.layers import WEIGHTS_FILE
from fed_userllm.models.llm import load_llm
from fed_userllm.models.userllm import ENCODER_DIR, UserLLM
from fed_userllm.rundir import find_encoder, find_userllm
from fed_userllm.runtime import resolve_device
from fed_userllm.serving.schema import EMBEDDING_DTYPE, TASKS
from fed_userllm.tasks.prompts import INSTRUCTIONS, QUESTIONS, format_prompt
from fed_userllm.train.contextualize import load_task
from fed_userllm.train.contextualize_config import ContextualizeConfig

FREE_INSTRUCTION = "Answer the user's request. Personalize the answer to the user's history."


class PrecomputedStates(nn.Module):
    """Stands in for the user encoder: the phone already ran it, so ``encode`` returns the states it sent.

    Plugged into ``UserLLM.from_pretrained(..., encoder=...)``, it lets the UserLLM apply its own projection
    and cross-attention / soft prompt exactly as in training, with no copy of that logic here. ``encoder``
    (the on-device encoder's weights) serves models trained with ``user_tokens='next_item'``: its next-item
    head maps the sent states to the vector the model reads.
    """

    def __init__(self, state_dim: int, encoder: nn.Module | None = None):
        super().__init__()
        self.state_dim = state_dim  # the encoder's per-event output width (its .pte's embedding_dim)
        self.encoder = encoder
        self.next_item_dim = getattr(encoder, "next_item_dim", None)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["states"]

    def next_item_vectors(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.next_item_vectors(states, mask)


@dataclass
class Job:
    """One validated request (one choice of it), ready for batching. ``on_text`` receives the answer's text
    piece by piece while it is generated (streaming); the pieces joined are a prefix of `Answer.text`."""

    states: torch.Tensor  # [n_events, state_dim] float32, real events only
    prompt: str
    task: str
    constrained: bool
    k: int
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    on_text: Callable[[str], None] | None = None

    @property
    def key(self) -> tuple:
        """Requests with equal keys share one generate call."""
        if self.constrained:
            return self.task, self.k
        return "generate", self.max_new_tokens, self.temperature, self.top_p


@dataclass
class Answer:
    text: str
    items: list[tuple[int, str]] | None
    tokens: int  # new tokens generated (0 for ranked tasks)
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence, or a ranked answer) or "length" (max_new_tokens reached)
    batch_size: int
    compute_s: float


class TextDeltas(BaseStreamer):
    """A ``generate`` streamer for a batch: decodes each row's new tokens as they come and hands the new
    complete words to that row's callback. Rows end at their first EOS; the last word waits for the final
    text (a partial word, or an incomplete multi-byte character, may still change)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callbacks: Sequence[Callable[[str], None] | None]):
        self.tokenizer, self.callbacks = tokenizer, list(callbacks)
        self.tokens: list[list[int]] = [[] for _ in self.callbacks]
        self.sent = [""] * len(self.callbacks)
        self.ended = [callback is None for callback in self.callbacks]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row]:
                continue
            if token == self.tokenizer.eos_token_id:
                self.ended[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            words = text[: text.rfind(" ") + 1]
            if len(words) > len(self.sent[row]) and words.startswith(self.sent[row]):
                self.callbacks[row](words[len(self.sent[row]):])
                self.sent[row] = words

    def end(self) -> None:
        """Nothing to flush: the rest of each text comes with its `Answer`."""


class ServedModel:
    """A UserLLM loaded once, frozen, in inference mode, that takes precomputed encoder states.

    ``catalogs`` are what constrained decoding ranks per task: {"nextitem": {item id: title},
    "favgenre": {genre id: name}}.
    """

    def __init__(self, model: UserLLM, tokenizer: PreTrainedTokenizerBase, encoder_hash: str, max_len: int,
                 catalogs: dict[str, dict[int, str]], noun: str = "movie", trained_task: str | None = None,
                 source: str = ""):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.encoder_hash, self.max_len, self.noun = encoder_hash, max_len, noun
        self.trained_task, self.source = trained_task, source
        self.name = Path(source).name or "fed-userllm"  # the model id of the OpenAI-compatible API
        self.state_dim = model.encoder.state_dim  # width of the per-event states a phone sends
        self.device = next(model.parameters()).device
        self.catalogs = {task: names for task, names in catalogs.items() if names}
        self.tries = {
            task: TitleTrie.from_titles(list(names.values()), tokenizer, list(names))
            for task, names in self.catalogs.items()
        }

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> ServedModel:
        """Load the User-LLM of a contextualize or Flower run (or of its userllm/ folder), the task's data for
        the catalogs, and the hash of the encoder whose outputs the model was trained on."""
        source = find_userllm(path)
        config = ContextualizeConfig.from_dict(source.config)
        if config.method == "textprompt":
            raise ValueError(f"{path}: a TextPrompt baseline (method='textprompt') reads the history as text and "
                             "takes no embeddings: only User-LLM runs can be served")
        if config.encoder_prior:
            raise ValueError(f"{path}: this User-LLM ranks titles on the encoder's prior (encoder_prior=True), "
                             "which needs the encoder's item scores, not the states a phone sends; it cannot be "
                             "served (rank with `fed-userllm evaluate-llm`)")
        saved = source.folder / ENCODER_DIR  # folders written before every encoder was saved: the encoder run's
        encoder_dir = saved if saved.is_dir() else find_encoder(config.encoder).folder
        encoder = load_pretrained(encoder_dir, "cpu")
        llm, tokenizer = load_llm(config.llm, device=resolve_device(device))
        states = PrecomputedStates(encoder.state_dim, encoder)
        model = UserLLM.from_pretrained(source.folder, llm=llm, encoder=states)
        task = load_task(config, tokenizer)
        return cls(model, tokenizer, encoder_weights_hash(encoder_dir), encoder.config.max_len,
                   catalogs(task.seq), task.noun, config.task, str(source.run.path))

    def prompt(self, task: str, text: str | None) -> str:
        """The prompt text: NextItem / FavGenre ask exactly what `fed_userllm.tasks` trained on (no text
        history); ``free`` sends the request under a generic instruction."""
        if task == "free":
            return format_prompt(self.tokenizer, FREE_INSTRUCTION, text)
        return format_prompt(self.tokenizer, INSTRUCTIONS[task].format(noun=self.noun),
                             QUESTIONS[task].format(noun=self.noun))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """A conversation as one prompt, formatted as `prompt` formats a single request: the tokenizer's chat
        template (the generic instruction as the system turn unless the conversation has one), else lines."""
        if not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": FREE_INSTRUCTION}, *messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages) + "\nAnswer:"

    def info(self) -> dict:
        llm = self.model.llm
        return {
            "name": self.name,
            "source": self.source,
            "llm": self.model.config.llm,
            "llm_type": llm.config.model_type,
            "llm_dtype": str(llm.dtype).removeprefix("torch."),
            "integration": self.model.config.integration,
            "strategy": self.model.config.strategy,
            "device": str(self.device),
            "encoder_hash": self.encoder_hash,
            "embedding": {"shape": ["T", self.state_dim], "dtype": EMBEDDING_DTYPE, "max_events": self.max_len},
            "tasks": list(TASKS),
            "trained_task": self.trained_task,
            "constrained_tasks": sorted(self.tries),
        }

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> list[Answer]:
        """Answer jobs sharing one key with one batched generate call."""
        start = time.perf_counter()
        n = max(len(j.states) for j in jobs)
        states = torch.zeros(len(jobs), n, self.state_dim)
        mask = torch.zeros(len(jobs), n, dtype=torch.bool)
        for i, job in enumerate(jobs):
            states[i, : len(job.states)], mask[i, : len(job.states)] = job.states, True
        user = {"states": states.to(self.device), "mask": mask.to(self.device)}
        prompts, first = [j.prompt for j in jobs], jobs[0]
        prompt_tokens = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        if first.constrained:
            names = self.catalogs[first.task]
            trie = self.tries[first.task]
            ranked = rank_titles(self.model, self.tokenizer, prompts, trie, first.k, batch_user=user)
            items = [[(i, names[i]) for i in row if i >= 0] for row in ranked.tolist()]
            texts = [row[0][1] if row else "" for row in items]
            tokens, reasons = [0] * len(jobs), ["stop"] * len(jobs)
        else:
            texts, tokens, reasons = self._generate(user, jobs)
            items = [None] * len(jobs)
        seconds = time.perf_counter() - start
        return [Answer(*answer, len(jobs), seconds)
                for answer in zip(texts, items, tokens, prompt_tokens, reasons, strict=True)]

    def _generate(self, user: dict, jobs: list[Job]) -> tuple[list[str], list[int], list[str]]:
        tok, first = self.tokenizer, jobs[0]
        enc = tok([j.prompt for j in jobs], return_tensors="pt", padding=True, padding_side="left").to(self.device)
        sampling = dict(do_sample=False)
        if first.temperature > 0:
            sampling = dict(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        if any(j.on_text for j in jobs):
            sampling["streamer"] = TextDeltas(tok, [j.on_text for j in jobs])
        out = self.model.generate(user, enc["input_ids"], enc["attention_mask"], max_new_tokens=first.max_new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
        texts, counts, reasons = [], [], []
        for row in out.tolist():
            stopped = tok.eos_token_id in row
            if stopped:
                row = row[: row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True))
            counts.append(len(row))
            reasons.append("stop" if stopped or len(row) < first.max_new_tokens else "length")
        return texts, counts, reasons


def encoder_weights_hash(encoder_dir: str | Path) -> str:
    """sha256 of the encoder's safetensors file: names the exact encoder whose outputs the server accepts."""
    return hashlib.sha256((Path(encoder_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()


def catalogs(seq: UserSequences) -> dict[str, dict[int, str]]:
    """What constrained decoding ranks, as the tasks do: every item of the item vocabulary (raw id -> title)
    and every genre of the genre vocabulary (id -> name)."""
    return {"nextitem": {int(raw): seq.catalog.title(raw) for raw in seq.vocabs["item"].tokens},
            "favgenre": {i + NUM_RESERVED: str(g) for i, g in enumerate(seq.vocabs["genre"].tokens)}}
