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

from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.userllm import UserLLM, UserLLMConfig
from fed_userllm.tasks.prompts import INSTRUCTIONS, QUESTIONS

SPECIALS = ["<pad>", "<unk>", "<eos>"]
VOCAB = 48
TITLES = ["alien", "alien three", "aliens", "the matrix", "the matrix reloaded", "toy story", "toy story", "heat"]
PROMPT_WORDS = ["next movie :", "user likes action", "recommend a film"]
USER_VOCAB = {"item": 20, "genre": 6, "rating": 8}
BASE_TEXT = [*INSTRUCTIONS.values(), *QUESTIONS.values(), "Past movies, oldest first: ; . movie item place",
             "user Answer: Rating: /5 Item: Synthetic Movie Genre 0123456789 ( ) , ' - ?"]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), digits])


def tiny_tokenizer(texts: Iterable[str] = (), base: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of ``texts`` plus (``base``) the task prompts; unknown words map to
    <unk>."""
    split = _pre_tokenizer()
    words = sorted({w for text in [*(BASE_TEXT if base else ()), *texts] for w, _ in split.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def tiny_llm(arch: str = "llama", seed: int = 0, layers: int = 2, vocab_size: int = VOCAB) -> torch.nn.Module:
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
    model = tiny_llm(arch, seed, layers, vocab_size=len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def set_gates(model: UserLLM, value: float) -> None:
    """Open every cross-attention gate of ``model`` to ``value`` (0 at initialisation: answers ignore the user)."""
    with torch.no_grad():
        for block in model.integration.blocks:
            block.gate_attn.fill_(value)
            block.gate_ff.fill_(value)


def title_tokenizer() -> PreTrainedTokenizerFast:
    """The User-LLM unit tests' tokenizer: the words of TITLES and PROMPT_WORDS only, ids below VOCAB."""
    tokenizer = tiny_tokenizer([*TITLES, *PROMPT_WORDS], base=False)
    assert len(tokenizer) <= VOCAB
    return tokenizer


def tiny_encoder(seed: int = 0) -> ARUserEncoder:
    torch.manual_seed(seed)
    cfg = ARUserEncoderConfig(vocab_sizes=USER_VOCAB, feature_dims={"item": 16, "genre": 8, "rating": 8},
                              d_model=32, n_layers=1, n_heads=2, max_len=8, dropout=0.0)
    return ARUserEncoder(cfg)

def user_batch(lengths: list[int], T: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    batch = {f: torch.randint(3, v, (len(lengths), T), generator=g) * mask for f, v in USER_VOCAB.items()}
    return {**batch, "mask": mask}

def make(arch: str = "llama", seed: int = 0, **overrides) -> UserLLM:
    """A User-LLM over a tiny random LLM (passed in, so ``llm`` is only a reference here)."""
    fields = dict(llm="unused-in-tests", xattn_every=1, xattn_dim=16, n_xattn_heads=2, num_latents=4,
                  num_task_prompt_tokens=3, lora_r=4)
    return UserLLM(UserLLMConfig(**fields | overrides), tiny_encoder(seed), tiny_llm(arch, seed))

def text(B: int = 2, L: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    return ids, mask
