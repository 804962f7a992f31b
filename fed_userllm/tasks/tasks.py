"""The phase-two tasks of User-LLM (Ning, Liu et al., 2024, §4): NextItem, FavGenre and ReviewG.

An example is a *span* of one user's events, ``[start, end)`` in global event indices: the history. NextItem
asks for the title of event ``end``, ReviewG for the user's review of event ``end`` (its item and rating are
given), FavGenre for the most frequent genre in the history. Spans follow the paper's protocol: training
targets are training events only (never a user's validation or test target); evaluation targets are each
user's validation or test event, with every earlier event as history.

A task turns spans into prompts and targets (text), into training batches (the encoder's user batch plus
prompt + target tokens, labels -100 on the prompt), and scores a model on spans: NextItem by constrained beam
search over all item titles (Recall@1/5/10), FavGenre over the genre names (Recall@1), ReviewG by greedy
generation (ROUGE-1/2/L F1). Models are a `UserLLM` (given the user batch) or a plain causal LM that reads
the history as text (the TextPrompt baselines).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from rouge_score import rouge_scorer
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from fed_userllm.data.sequences import UserSequences
from fed_userllm.data.vocab import NUM_RESERVED, UNK_ID
from fed_userllm.eval.ranking import ranking_sums
from fed_userllm.models.constrained import TitleTrie, rank_titles
from fed_userllm.models.userllm import UserLLM
from fed_userllm.tasks.prompts import INSTRUCTIONS, QUESTIONS, format_prompt, history_text

SPLITS = ("train", "val", "test")
IGNORE = -100  # label of positions that carry no loss (the prompt, the padding)


class Task(ABC):
    """Base class: span construction, prompts, training batches; subclasses define targets and scoring."""

    name: ClassVar[str]

    def __init__(self, seq: UserSequences, tokenizer: PreTrainedTokenizerBase, noun: str = "movie"):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token (load_llm sets pad = EOS)")
        self.seq, self.tokenizer, self.noun = seq, tokenizer, noun

    # --- examples -------------------------------------------------------------------------------------------
    def spans(self, users: np.ndarray | None, split: str, history_len: int) -> np.ndarray:
        """Example spans [N, 2] of ``users`` (all when None): every training event as a target for ``train``,
        each user's validation / test event otherwise; histories hold at most ``history_len`` events."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if history_len < 1:
            raise ValueError(f"history_len={history_len}: expected >= 1")
        seq = self.seq
        users = np.arange(seq.num_users) if users is None else np.asarray(users, dtype=np.int64)
        if split == "train":
            starts, ends = seq.train_ranges(users)
            n = np.maximum(ends - starts - 1, 0)  # targets: every training event after the first
            first = np.repeat(starts, n)
            targets = first + 1 + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        else:
            targets, first = seq.target_index(users, split), seq.offsets[users]
        spans = np.stack([np.maximum(first, targets - history_len), targets], axis=1).astype(np.int64)
        return spans[self.usable(spans)]

    def usable(self, spans: np.ndarray) -> np.ndarray:
        """Which spans have a well-defined target (all, unless a task says otherwise)."""
        return np.ones(len(spans), dtype=bool)

    def title(self, index: int) -> str:
        return self.seq.catalog.title(int(self.seq.raw_item[index]))

    def event_text(self, index: int) -> str:
        """How one history event reads in a text prompt."""
        return self.title(index)

    def question(self, end: int) -> str:
        return QUESTIONS[self.name].format(noun=self.noun)

    def prompt(self, start: int, end: int, text_history: int = 0) -> str:
        """Instruction + question, with the last ``text_history`` events of the span written out as text."""
        events = [self.event_text(i) for i in range(max(start, end - text_history), end)]
        message = "\n".join(filter(None, [history_text(events, self.noun), self.question(end)]))
        return format_prompt(self.tokenizer, INSTRUCTIONS[self.name].format(noun=self.noun), message)

    @abstractmethod
    def target(self, start: int, end: int) -> str:
        """The answer text the LLM is trained to produce for the span."""

    def pairs(self, spans: np.ndarray, text_history: int = 0) -> list[tuple[str, str]]:
        """(prompt, target) text of every span."""
        return [(self.prompt(s, e, text_history), self.target(s, e)) for s, e in spans.tolist()]

    def batch(self, spans: np.ndarray, history_len: int, text_history: int = 0,
              max_target_tokens: int = 64) -> dict:
        """Training batch: ``user`` (encoder input over the last ``history_len`` events of each span) and
        right-padded ``input_ids`` / ``attention_mask`` / ``labels`` = prompt + target + EOS, prompt masked.

        Prompt and target are tokenized separately (prompt exactly as at generation time), so the target
        tokens are the ones constrained decoding produces.
        """
        tok = self.tokenizer
        prompts, answers = zip(*self.pairs(spans, text_history), strict=True)
        prompt_ids = tok(list(prompts))["input_ids"]
        answer_ids = tok(list(answers), add_special_tokens=False)["input_ids"]
        targets = [t[:max_target_tokens] + [tok.eos_token_id] for t in answer_ids]
        rows = list(zip(prompt_ids, targets, strict=True))
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for r, (p, t) in enumerate(rows):
            ids[r, : len(p) + len(t)] = torch.tensor(p + t)
            labels[r, len(p) : len(p) + len(t)] = torch.tensor(t)
            mask[r, : len(p) + len(t)] = 1
        user = self.seq.gather(spans[:, 0], spans[:, 1], history_len)
        return {"user": user, "input_ids": ids, "attention_mask": mask, "labels": labels}

    # --- evaluation -----------------------------------------------------------------------------------------
    @abstractmethod
    def score(self, model: nn.Module, prompts: list[str], spans: np.ndarray,
              batch_user: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """Metric sums (plus the count ``n``) of ``model`` on one batch of spans."""


class NextItem(Task):
    """Generate the next item's title; Recall@1/5/10 by K=10 constrained beam search over all titles."""

    name = "nextitem"

    def __init__(self, seq: UserSequences, tokenizer: PreTrainedTokenizerBase, noun: str = "movie",
                 num_beams: int = 10):
        super().__init__(seq, tokenizer, noun)
        self.num_beams = num_beams

    def target(self, start: int, end: int) -> str:
        return self.title(end)

    @cached_property
    def titles(self) -> tuple[TitleTrie, dict[int, int]]:
        """Trie over the distinct titles of the item vocabulary and raw item id -> title index.

        Items sharing a title share its index, so generating that title counts for every one of them.
        """
        vocab = self.seq.vocabs["item"]
        raw = [vocab.decode(i) for i in range(NUM_RESERVED, len(vocab))]
        titles = [self.seq.catalog.title(r) for r in raw]
        index = {t: i for i, t in enumerate(dict.fromkeys(titles))}
        group = {r: index[t] for r, t in zip(raw, titles, strict=True)}
        return TitleTrie.from_titles(list(index), self.tokenizer), group

    @property
    def answer_trie(self) -> TitleTrie:
        """The names constrained ranking chooses among (the catalog objective scores them exactly)."""
        return self.titles[0]

    def answer_ids(self, spans: np.ndarray) -> torch.Tensor:
        """The answer trie's id of each span's target."""
        return self.target_titles(spans)

    @cached_property
    def item_titles(self) -> torch.Tensor:
        """Title index of every item id of the vocabulary (-1 for the reserved ids): the encoder's item space
        in the trie's title space."""
        vocab, group = self.seq.vocabs["item"], self.titles[1]
        return torch.tensor([-1] * NUM_RESERVED + [group[vocab.decode(i)] for i in range(NUM_RESERVED, len(vocab))])

    def target_titles(self, spans: np.ndarray) -> torch.Tensor:
        """Title index of each span's target item (-2 when the item is outside the vocabulary: a miss)."""
        group = self.titles[1]
        return torch.tensor([group.get(int(self.seq.raw_item[e]), -2) for e in spans[:, 1].tolist()])

    def score(self, model, prompts, spans, batch_user):
        trie = self.titles[0]
        ranked = rank(model, self.tokenizer, prompts, trie, min(self.num_beams, trie.num_distinct), batch_user)
        return ranking_sums(list_ranks(ranked, self.target_titles(spans)))


class FavGenre(Task):
    """Name the most frequent genre of the history (all genres of every item, ties -> smallest genre id, the
    rule of `UserSequences.favorite_genre`); Recall@1 by constrained decoding over the genre names."""

    name = "favgenre"

    def __init__(self, seq: UserSequences, tokenizer: PreTrainedTokenizerBase, noun: str = "movie",
                 num_beams: int = 5):
        super().__init__(seq, tokenizer, noun)
        self.num_beams = num_beams
        self.genre_ids = {g: i + NUM_RESERVED for i, g in enumerate(seq.vocabs["genre"].tokens)}
        if not self.genre_ids:
            raise ValueError("the dataset has no genres in its training events: FavGenre needs them")

    def genres(self, index: int) -> tuple[str, ...]:
        return self.seq.catalog.genres.get(int(self.seq.raw_item[index]), ())

    def label(self, start: int, end: int) -> int:
        """Genre vocabulary id of the history's favorite genre (UNK when no item has a known genre)."""
        counts = Counter(g for i in range(start, end) for g in self.genres(i) if g in self.genre_ids)
        return min((-c, self.genre_ids[g]) for g, c in counts.items())[1] if counts else UNK_ID

    def usable(self, spans: np.ndarray) -> np.ndarray:
        n = self.seq.num_events
        known = np.fromiter((any(g in self.genre_ids for g in self.genres(i)) for i in range(n)), np.int64, n)
        cumulative = np.concatenate([[0], np.cumsum(known)])
        return cumulative[spans[:, 1]] > cumulative[spans[:, 0]]

    def event_text(self, index: int) -> str:
        return f"{self.title(index)} ({', '.join(self.genres(index))})"

    def target(self, start: int, end: int) -> str:
        return self.seq.vocabs["genre"].decode(self.label(start, end))

    @cached_property
    def answer_trie(self) -> TitleTrie:
        """The genre names, by genre vocabulary id."""
        return TitleTrie.from_titles(list(self.genre_ids), self.tokenizer, list(self.genre_ids.values()))

    def answer_ids(self, spans: np.ndarray) -> torch.Tensor:
        """Each span's favorite genre (its genre vocabulary id)."""
        return torch.tensor([self.label(s, e) for s, e in spans.tolist()])

    def score(self, model, prompts, spans, batch_user):
        trie = self.answer_trie
        ranked = rank(model, self.tokenizer, prompts, trie, min(self.num_beams, trie.num_distinct), batch_user)
        return {"recall@1": float((ranked[:, 0] == self.answer_ids(spans)).sum()), "n": float(len(spans))}


class ReviewG(Task):
    """Write the user's review of event ``end``'s item given its rating; ROUGE-1/2/L F1 of greedy output."""

    name = "reviewg"
    ROUGE = ("rouge1", "rouge2", "rougeL")

    def __init__(self, seq: UserSequences, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 noun: str = "item", max_new_tokens: int = 64):
        super().__init__(seq, tokenizer, noun)
        if len(texts) != seq.num_events:
            raise ValueError(f"{len(texts)} review texts for {seq.num_events} events: expected one per event "
                             "(fed_userllm.data.reviews.event_texts aligns them)")
        self.texts, self.max_new_tokens = np.asarray(texts, dtype=object), max_new_tokens
        self.scorer = rouge_scorer.RougeScorer(list(self.ROUGE), use_stemmer=True)

    def usable(self, spans: np.ndarray) -> np.ndarray:
        return self.texts[spans[:, 1]] != ""

    def rating(self, index: int) -> int:
        return int(self.seq.vocabs["rating"].decode(int(self.seq.features["rating"][index])))

    def event_text(self, index: int) -> str:
        return f"{self.title(index)} ({self.rating(index)}/5)"

    def question(self, end: int) -> str:
        return f"{self.noun.capitalize()}: {self.title(end)}\nRating: {self.rating(end)}/5"

    def target(self, start: int, end: int) -> str:
        return str(self.texts[end])

    def rouge(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Summed ROUGE F1 of each prediction against its reference, plus the count ``n``."""
        sums = dict.fromkeys(self.ROUGE, 0.0)
        for prediction, reference in zip(predictions, references, strict=True):
            for name, score in self.scorer.score(reference, prediction).items():
                sums[name] += score.fmeasure
        return {**sums, "n": float(len(references))}

    def score(self, model, prompts, spans, batch_user):
        new = generate(model, self.tokenizer, prompts, batch_user, max_new_tokens=self.max_new_tokens,
                       do_sample=False)
        predictions = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return self.rouge([p.strip() for p in predictions], [self.target(s, e) for s, e in spans.tolist()])


TASKS = {cls.name: cls for cls in (NextItem, FavGenre, ReviewG)}


def list_ranks(ranked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based position of each target in its ranked list [B, k]; ``inf`` when absent."""
    hits = ranked == targets[:, None]
    first = hits.float().argmax(1).float()
    return torch.where(hits.any(1), first, torch.full_like(first, float("inf")))


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device) -> dict:
    return tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)


def prompt_cache(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], copies: int):
    """KV cache of every prompt but its last token, repeated ``copies`` times per prompt.

    Beam search copies each prompt to every beam before the prefill; for the long TextPrompt prompts that
    prefill dominates. Computing it once and passing the repeated cache to ``generate`` gives the same
    result (the prompts are tokenized and left-padded exactly as `rank_titles` does) at 1/copies the cost.
    """
    enc = _encode(tokenizer, prompts, next(model.parameters()).device)
    ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the rule generate uses for left-padded prompts
    cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
    cache.batch_repeat_interleave(copies)
    return cache


@torch.no_grad()
def rank(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], trie: TitleTrie,
         k: int, batch_user: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """`rank_titles` for a UserLLM (with its user batch) or a text-only LM (prompt prefilled once)."""
    if batch_user is not None:
        return rank_titles(model, tokenizer, prompts, trie, k, batch_user=batch_user)
    if k == 1:
        return rank_titles(model, tokenizer, prompts, trie, k)
    cache = prompt_cache(model, tokenizer, prompts, k)
    return rank_titles(model, tokenizer, prompts, trie, k, past_key_values=cache)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             batch_user: dict[str, torch.Tensor] | None, **kwargs) -> torch.Tensor:
    """New tokens only [B, L] for either kind of model (prompts left-padded)."""
    enc = _encode(tokenizer, prompts, next(model.parameters()).device)
    kwargs = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **kwargs}
    if batch_user is not None:
        return model.generate(batch_user, enc["input_ids"], enc["attention_mask"], **kwargs)
    return model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a (nested) batch of tensors to ``device``."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, spans: np.ndarray, history_len: int, text_history: int = 0,
             batch_size: int = 16, progress: bool = False) -> dict[str, float]:
    """Summed metrics of ``model`` on ``spans`` (use `fed_userllm.eval.ranking.finalize` for means)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for lo in tqdm(range(0, len(spans), batch_size), desc=f"eval {task.name}", disable=not progress,
                   leave=False):
        chunk = spans[lo:lo + batch_size]
        prompts = [task.prompt(s, e, text_history) for s, e in chunk.tolist()]
        user = None
        if isinstance(model, UserLLM):
            user = to_device(task.seq.gather(chunk[:, 0], chunk[:, 1], history_len), device)
        part = task.score(model, prompts, chunk, user)
        sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
    model.train(was_training)
    return sums
