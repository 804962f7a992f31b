"""Tiny, offline LLM pieces for tests: a word-level tokenizer built in memory and random Llama / GPT-2 models.

The tokenizer splits on whitespace and punctuation and writes digits one by one, so every synthetic title
("Synthetic Movie 12 (1961)") and genre name ("Genre03") has its own token sequence from a small vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fed_userllm.models.userllm import UserLLM
from fed_userllm.tasks.prompts import INSTRUCTIONS, QUESTIONS

SPECIALS = ["<pad>", "<unk>", "<eos>"]
BASE_TEXT = [*INSTRUCTIONS.values(), *QUESTIONS.values(), "Past movies, oldest first: ; . movie item place",
             "user Answer: Rating: /5 Item: Synthetic Movie Genre 0123456789 ( ) , ' - ?"]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), digits])


def tiny_tokenizer(texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of ``texts`` plus the task prompts; unknown words map to <unk>."""
    split = _pre_tokenizer()
    words = sorted({w for text in [*BASE_TEXT, *texts] for w, _ in split.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def tiny_llm(vocab_size: int, arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A random causal LM (hidden size 32) with pad=0, eos=2 like `tiny_tokenizer`."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          initializer_range=0.2)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=512,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def save_tiny_llm(directory: Path, texts: Iterable[str] = (), arch: str = "llama", seed: int = 0,
                  layers: int = 4) -> str:
    """Write a tiny LLM + tokenizer to ``directory`` (loadable with ``load_llm(str(directory))``); 4 layers
    by default, so User-LLM's default cross-attention after every 4th layer has a place."""
    tokenizer = tiny_tokenizer(texts)
    model = tiny_llm(len(tokenizer), arch, seed, layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def set_gates(model: UserLLM, value: float) -> None:
    """Open every cross-attention gate of ``model`` to ``value`` (0 at initialisation: answers ignore the user)."""
    with torch.no_grad():
        for block in model.xattn:
            block.gate_attn.fill_(value)
            block.gate_ff.fill_(value)
