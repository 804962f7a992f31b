"""Trie-constrained beam search: only real titles come out, ranked by their true log-probability."""

import pytest
import torch
from llm_fixtures import TITLES, make, set_gates, tiny_llm, title_tokenizer, user_batch

from fed_userllm.models.constrained import TitleTrie, rank_titles

PROMPTS = ["user likes action next movie :", "recommend a film :"]


def test_trie_handles_shared_prefixes_and_duplicates():
    tok = title_tokenizer()
    trie = TitleTrie.from_titles(TITLES, tok, item_ids=[10 + i for i in range(len(TITLES))])
    eos = tok.eos_token_id
    alien, three, matrix = (tok.convert_tokens_to_ids(w) for w in ("alien", "three", "matrix"))
    assert trie.num_distinct == len(set(TITLES))
    assert set(trie.allowed([alien])) == {eos, three}  # "alien" ends here or continues to "alien three"
    assert trie.allowed([alien, eos]) == [eos] and trie.allowed([matrix]) == [eos]  # finished / off the trie
    assert set(trie.allowed([])) == {tok.convert_tokens_to_ids(t.split()[0]) for t in TITLES}
    assert trie.lookup([alien, eos, 0, 0]) == [10] and trie.lookup([alien, three, eos]) == [11]
    assert trie.lookup(tok("toy story")["input_ids"] + [eos]) == [15, 16]  # duplicate title -> both items
    assert trie.lookup([alien]) == [] and trie.lookup([matrix, eos]) == []
    assert trie.max_len == 4  # "the matrix reloaded" + EOS
    with pytest.raises(ValueError, match="one final EOS"):
        TitleTrie([[5, 6]], eos_token_id=2, item_ids=[0])
    with pytest.raises(ValueError, match="item_ids"):
        TitleTrie([[5, 2]], eos_token_id=2, item_ids=[0, 1])


def title_logprob(model, prompt_ids, title_ids, trie, users=None) -> float:
    """Teacher-forced log P(title + EOS | prompt, the answer is a title): each step renormalized over the tokens
    the trie allows there."""
    ids = torch.tensor([prompt_ids + title_ids])
    logits = model(users, ids).logits if users is not None else model(input_ids=ids).logits
    logits = logits[0, -len(title_ids) - 1 : -1]
    total = 0.0
    for j, token in enumerate(title_ids):
        allowed = trie.allowed(title_ids[:j])
        total += logits[j, allowed].log_softmax(-1)[allowed.index(token)].item()
    return total


def exact_ranking(model, tok, trie, k, users=None) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        user = None if users is None else {key: v[i : i + 1] for key, v in users.items()}
        p = tok(prompt)["input_ids"]
        scored = sorted(trie.items.items(), key=lambda kv: -title_logprob(model, p, list(kv[0]), trie, user))
        out.append([item for _, items in scored for item in items][:k])
    return out


@pytest.mark.parametrize("kind", ["xattn", "softprompt", "plain"])
def test_rank_titles_matches_exhaustive_scoring(kind):
    tok = title_tokenizer()
    trie = TitleTrie.from_titles(TITLES, tok)
    users = user_batch([6, 2])
    if kind == "plain":
        model, users = tiny_llm("gpt2", seed=2), None
    else:
        model = make("llama", seed=2, integration=kind)
        if kind == "xattn":
            set_gates(model, 0.8)
    k = trie.num_distinct  # as many beams as titles: beam search is exact, so it must equal exhaustive scoring
    with torch.no_grad():
        ranked = rank_titles(model, tok, PROMPTS, TITLES, k, batch_user=users)
        assert ranked.tolist() == exact_ranking(model, tok, trie, k, users)
        top3 = rank_titles(model, tok, PROMPTS, trie, 3, batch_user=users)
    assert top3.shape == (2, 3) and (top3 >= 0).all()
    assert all(len(set(row)) == 3 for row in top3.tolist())


@pytest.mark.parametrize("integration", ["xattn", "softprompt"])
def test_every_constrained_beam_is_a_title(integration):
    tok = title_tokenizer()
    trie = TitleTrie.from_titles(TITLES, tok)
    model = make("gpt2", seed=1, integration=integration)
    if integration == "xattn":
        set_gates(model, 0.8)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(user_batch([6, 4]), enc["input_ids"], enc["attention_mask"], num_beams=4,
                         num_return_sequences=4, max_new_tokens=trie.max_len, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, prefix_allowed_tokens_fn=lambda i, ids: trie.allowed(ids))
    assert out.shape[0] == 8
    for seq in out.tolist():
        assert seq.count(tok.eos_token_id) >= 1
        title = tok.decode(seq[: seq.index(tok.eos_token_id)], skip_special_tokens=True)
        assert title in TITLES


def test_rank_titles_rejects_bad_k():
    tok = title_tokenizer()
    with pytest.raises(ValueError, match="k=8"):
        rank_titles(tiny_llm("gpt2"), tok, PROMPTS, TITLES, 8)  # 7 distinct titles
