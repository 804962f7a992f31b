"""The catalog objective: cached text states give the model's exact log P(title | catalog), and train."""

import numpy as np
import pytest
import torch
from llm_fixtures import tiny_llm, tiny_tokenizer

from fed_userllm.data import load_sequences
from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.userllm import UserLLM, UserLLMConfig
from fed_userllm.tasks import NextItem
from fed_userllm.tasks.catalog import CatalogScorer, branching_nodes
from fed_userllm.train.contextualize import ContextualizeConfig, Examples, local_train_steps, make_optimizer

DATA = "synthetic:users=40,items=30,seed=1"
H = 8


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FED_USERLLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def seq():
    return load_sequences(DATA, max_len=10, cache=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def model_for(seq, tok, arch="llama", layers=(-1,), strategy="enc", seed=0) -> UserLLM:
    torch.manual_seed(seed)
    dims = {"item": 8, "genre": 4, "rating": 4}
    encoder = ARUserEncoder(ARUserEncoderConfig(vocab_sizes=seq.vocab_sizes, feature_dims=dims, d_model=16,
                                                n_layers=1, n_heads=2, max_len=11, dropout=0.0))
    config = UserLLMConfig(llm="unused", xattn_layers=list(layers), xattn_dim=16, n_xattn_heads=2, num_latents=4,
                           strategy=strategy)
    model = UserLLM(config, encoder, tiny_llm(len(tok), arch, seed=seed, layers=3))
    with torch.no_grad():  # a trained-looking block: open gates, so the user really changes the scores
        for block in model.xattn:
            block.gate_attn.fill_(0.8)
            block.gate_ff.fill_(-0.5)
    return model.eval()


def full_forward_log_probs(model: UserLLM, task: NextItem, spans: np.ndarray) -> torch.Tensor:
    """log P(target title | catalog) by running the whole model on prompt + title, renormalizing each step's
    log-probabilities over the tokens the trie allows (what constrained ranking scores)."""
    trie, tok = task.titles[0], task.tokenizer
    prompt = tok(task.prompt(0, 0))["input_ids"]
    sequences = {items[0]: seq for seq, items in trie.items.items()}
    out = []
    for (s, e), title in zip(spans.tolist(), task.target_titles(spans).tolist(), strict=True):
        seq = list(sequences[title])
        user = task.seq.gather(np.array([s]), np.array([e]), H)
        with torch.no_grad():
            logits = model(user, torch.tensor([prompt + seq[:-1]])).logits[0, len(prompt) - 1:]
        total = 0.0
        for k, token in enumerate(seq):
            allowed = trie.allowed(seq[:k])
            total += logits[k, allowed].log_softmax(-1)[allowed.index(token)].item()
        out.append(total)
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_scores_equal_the_full_model(seq, tok, arch):
    task = NextItem(seq, tok)
    model = model_for(seq, tok, arch)
    scorer = CatalogScorer(model, task.titles[0], task.prompt(0, 0), tok, batch_size=7)
    spans = task.spans(np.arange(12), "test", H)
    with torch.no_grad():
        cached = scorer.log_probs(task.seq.gather(spans[:, 0], spans[:, 1], H), task.target_titles(spans))
    expected = full_forward_log_probs(model, task, spans)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)
    assert (cached < 0).all() and cached.std() > 0.01  # real, user-dependent probabilities


def test_log_probs_sum_to_one_over_the_catalog(seq, tok):
    task = NextItem(seq, tok)
    model = model_for(seq, tok)
    trie = task.titles[0]
    scorer = CatalogScorer(model, trie, task.prompt(0, 0), tok)
    titles = torch.tensor(sorted(i for items in trie.items.values() for i in items))
    span = task.spans(np.array([5]), "test", H)
    user = {k: v.expand(len(titles), -1) for k, v in task.seq.gather(span[:, 0], span[:, 1], H).items()}
    with torch.no_grad():
        total = scorer.log_probs(user, titles).exp().sum()
    assert abs(total.item() - 1.0) < 1e-4
    assert len(branching_nodes(trie)) < sum(len(s) for s in trie.items)  # only branching nodes are scored


def test_the_catalog_objective_trains_the_block_and_encoder_only(seq, tok):
    task = NextItem(seq, tok)
    model = model_for(seq, tok)
    frozen = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    scorer = CatalogScorer(model, task.titles[0], task.prompt(0, 0), tok)
    examples = Examples(task, task.spans(None, "train", H), H, catalog=scorer)
    fixed = examples.sample(64, seed=99, step=0)[0]
    with torch.no_grad():
        before = examples.loss(model, fixed).item()
    config = ContextualizeConfig(encoder="unused", lr=3e-3)
    local_train_steps(model, examples, 40, make_optimizer(model, config), batch_size=16)
    with torch.no_grad():
        after = examples.loss(model.eval(), fixed).item()
    assert after < before - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.llm.named_parameters())


def test_the_catalog_objective_refuses_models_it_cannot_score(seq, tok):
    task = NextItem(seq, tok)
    trie, prompt = task.titles[0], task.prompt(0, 0)
    with pytest.raises(ValueError, match="after the last decoder layer"):
        CatalogScorer(model_for(seq, tok, layers=(0, 2)), trie, prompt, tok)
    with pytest.raises(ValueError, match="strategy='lora'"):
        CatalogScorer(model_for(seq, tok, strategy="lora"), trie, prompt, tok)
    with pytest.raises(ValueError, match="objective='catalog'"):
        ContextualizeConfig(encoder="e", task="favgenre", objective="catalog")
    with pytest.raises(ValueError, match="objective='catalog'"):
        ContextualizeConfig(encoder="e", text_history_len=10, objective="catalog")


def test_xattn_layers_place_the_blocks(seq, tok):
    assert model_for(seq, tok, layers=(-1,)).xattn_at == [2]
    assert model_for(seq, tok, layers=(0, -1, 2)).xattn_at == [0, 2]
    with pytest.raises(ValueError, match=r"xattn_layers=\[3\]"):
        model_for(seq, tok, layers=(3,))


def test_exact_ranking_orders_every_title_by_its_log_probability(seq, tok):
    task = NextItem(seq, tok)
    model = model_for(seq, tok, "gpt2")
    trie = task.titles[0]
    scorer = CatalogScorer(model, trie, task.prompt(0, 0), tok)
    titles = torch.tensor(sorted(i for items in trie.items.values() for i in items))
    spans = task.spans(np.array([1, 4, 9]), "test", H)
    users = task.seq.gather(spans[:, 0], spans[:, 1], H)
    ranked = scorer.rank(users, k=5)
    for row in range(len(spans)):
        one = {k: v[row:row + 1].expand(len(titles), -1) for k, v in users.items()}
        with torch.no_grad():
            expected = titles[scorer.log_probs(one, titles).topk(5).indices]
        assert ranked[row].tolist() == expected.tolist()
