"""Constrained beam search over a closed list of titles: the NextItem evaluation of User-LLM (Ning, Liu et al.,
2024, §4).

Every title is tokenized with the LLM tokenizer and terminated with EOS; a token trie over these sequences
restricts each beam step to continuations of real titles, so beam search with K beams returns K titles ranked
by their probability among the catalog's titles: after the trie mask each step's log-probabilities are
renormalized over the allowed tokens (`RenormalizeAllowed`). Without that a title's score is its unnormalized
LM probability, where every extra token costs probability even when the trie forces it: short titles win
regardless of the user. Titles that share a prefix ("Alien", "Alien 3") and duplicate titles (several
items, one title) are both handled: each complete sequence maps to the list of its item ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase


class TitleTrie:
    """Token trie over title sequences (each ending with EOS) mapping complete sequences to item ids."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int, item_ids: Sequence[int]):
        if len(sequences) != len(item_ids):
            raise ValueError(f"{len(sequences)} title sequences but {len(item_ids)} item_ids")
        if not sequences:
            raise ValueError("titles: expected at least one title")
        self.eos_token_id = eos_token_id
        self.root: dict = {}
        self.items: dict[tuple[int, ...], list[int]] = {}
        for seq, item in zip(sequences, item_ids, strict=True):
            if len(seq) < 2 or seq[-1] != eos_token_id or eos_token_id in seq[:-1]:
                raise ValueError(f"title sequence {list(seq)} (item {item}): expected tokens then one final EOS")
            node = self.root
            for token in seq:
                node = node.setdefault(token, {})
            self.items.setdefault(tuple(seq), []).append(item)
        self.max_len = max(len(s) for s in sequences)

    @classmethod
    def from_titles(
        cls, titles: Sequence[str], tokenizer: PreTrainedTokenizerBase, item_ids: Sequence[int] | None = None
    ) -> TitleTrie:
        """Tokenize titles without special tokens and append EOS; item ids default to title indices."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer has no eos_token_id; titles need an end marker")
        seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in titles]
        return cls(seqs, eos, list(range(len(titles))) if item_ids is None else item_ids)

    @property
    def num_distinct(self) -> int:
        return len(self.items)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that continue ``prefix`` towards a title; [EOS] off the trie (such beams score -inf anyway)."""
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if not node:
                return [self.eos_token_id]
        return list(node)

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Item ids of the title spelled by ``tokens`` up to the first EOS; [] if not a title."""
        tokens = [int(t) for t in tokens]
        if self.eos_token_id not in tokens:
            return []
        return self.items.get(tuple(tokens[: tokens.index(self.eos_token_id) + 1]), [])


class RenormalizeAllowed(LogitsProcessor):
    """Log-softmax again after the trie's mask: the allowed tokens' probabilities sum to 1 at every step, so a
    title's beam score is log P(title | the LLM chooses among the catalog titles). Runs after generate's
    built-in processors (hence after ``prefix_allowed_tokens_fn``); a row with no finite score is kept."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        finite = torch.isfinite(scores).any(dim=-1, keepdim=True)
        return torch.where(finite, scores.log_softmax(dim=-1), scores)


def rank_titles(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    titles: TitleTrie | Sequence[str],
    k: int,
    batch_user: dict[str, torch.Tensor] | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Top-k item ids per prompt by constrained beam search -> LongTensor [B, k] (-1 where fewer were found).

    ``model`` is a ``UserLLM`` (pass ``batch_user``) or a plain HF causal LM (text-only baseline). Titles are
    ranked by total log-probability among the titles (`RenormalizeAllowed`, length_penalty=0) unless overridden
    in ``generate_kwargs`` (``logits_processor=LogitsProcessorList()`` ranks by unnormalized LM probability).
    """
    trie = titles if isinstance(titles, TitleTrie) else TitleTrie.from_titles(titles, tokenizer)
    if not 1 <= k <= trie.num_distinct:
        raise ValueError(f"k={k}: expected 1 <= k <= {trie.num_distinct} (number of distinct titles)")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    kwargs = dict(
        max_new_tokens=trie.max_len, num_beams=k, num_return_sequences=k, do_sample=False, length_penalty=0.0,
        eos_token_id=trie.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([RenormalizeAllowed()]),
    )
    kwargs.update(generate_kwargs)
    if batch_user is None:
        n_prompt = enc["input_ids"].shape[1]
        allowed = lambda i, ids: trie.allowed(ids[n_prompt:])  # noqa: E731
        out = model.generate(**enc, prefix_allowed_tokens_fn=allowed, **kwargs)[:, n_prompt:]
    else:
        out = model.generate(batch_user, enc["input_ids"], enc["attention_mask"],
                             prefix_allowed_tokens_fn=lambda i, ids: trie.allowed(ids), **kwargs)
    ranked = torch.full((len(prompts), k), -1, dtype=torch.long)
    for row, beams in enumerate(out.view(len(prompts), -1, out.shape[-1]).tolist()):
        found = list(dict.fromkeys(item for beam in beams for item in trie.lookup(beam)))[:k]
        ranked[row, : len(found)] = torch.tensor(found, dtype=torch.long)
    return ranked
