"""Phase-two tasks: spans, prompts, label masking, TextPrompt histories, constrained evaluation, ROUGE, and the
catalog objective (cached text states give the model's exact log P(title | catalog), and train)."""

import copy
import math

import numpy as np
import pytest
import torch
from llm_fixtures import tiny_llm, tiny_tokenizer
from peft import LoraConfig, get_peft_model

from fed_userllm.data import load_sequences
from fed_userllm.data.reviews import event_texts, read_reviews, review_sequences
from fed_userllm.eval.ranking import finalize
from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.constrained import rank_titles
from fed_userllm.models.userllm import UserLLM, UserLLMConfig
from fed_userllm.tasks import FavGenre, NextItem, ReviewG, evaluate, list_ranks, rank
from fed_userllm.tasks.catalog import CatalogScorer, branching_nodes
from fed_userllm.tasks.tasks import IGNORE
from fed_userllm.train.contextualize import make_optimizer
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.steps import Examples, local_train_steps, task_loss

DATA = "synthetic:users=40,items=30,seed=1"
H = 8  # history length (the tiny encoder takes up to 11 events)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def seq():
    return load_sequences(DATA, max_len=10, cache=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_userllm(seq, tok, seed: int = 0, arch: str = "llama", **overrides) -> UserLLM:
    torch.manual_seed(seed)
    dims = {"item": 8, "genre": 4, "rating": 4}
    encoder = ARUserEncoder(ARUserEncoderConfig(vocab_sizes=seq.vocab_sizes, feature_dims=dims, d_model=16,
                                                n_layers=1, n_heads=2, max_len=11, dropout=0.0))
    fields = dict(llm="unused", xattn_every=1, xattn_dim=16, n_xattn_heads=2, num_latents=4,
                  num_task_prompt_tokens=2)
    return UserLLM(UserLLMConfig(**fields | overrides), encoder, tiny_llm(arch, seed=seed, vocab_size=len(tok)))


# ---------------------------------------------------------------- examples and prompts


def test_spans_follow_the_protocol(seq, tok):
    task = NextItem(seq, tok)
    train = task.spans(None, "train", H)
    starts, ends = seq.train_ranges()
    assert len(train) == int(np.maximum(ends - starts - 1, 0).sum())  # every training event after the first
    user = np.searchsorted(seq.offsets, train[:, 1], side="right") - 1
    assert (train[:, 1] < seq.offsets[user + 1] - 2).all()  # never a validation or test target
    assert (train[:, 0] >= seq.offsets[user]).all() and (train[:, 1] - train[:, 0] >= 1).all()
    assert (train[:, 1] - train[:, 0] <= H).all() and (train[:, 1] - train[:, 0] == H).any()
    for split in ("val", "test"):
        users = np.array([0, 7, 39])
        spans = task.spans(users, split, H)
        assert spans[:, 1].tolist() == seq.target_index(users, split).tolist()
        np.testing.assert_array_equal(spans[:, 0], np.maximum(seq.offsets[users], spans[:, 1] - H))
    with pytest.raises(ValueError, match="split='dev'"):
        task.spans(None, "dev", H)


def test_prompt_target_and_label_masking(seq, tok):
    task = NextItem(seq, tok)
    spans = task.spans(np.array([3, 5, 9]), "test", H)
    batch = task.batch(spans, H)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, (s, e) in enumerate(spans.tolist()):
        prompt = tok(task.prompt(s, e))["input_ids"]  # tokenized as rank_titles tokenizes prompts
        title = seq.catalog.title(seq.raw_item[e])
        target = tok(title, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(target)
        assert batch["input_ids"][row, :n].tolist() == prompt + target
        assert batch["labels"][row, : len(prompt)].eq(IGNORE).all()
        assert batch["labels"][row, len(prompt) : n].tolist() == target
        assert batch["labels"][row, n:].eq(IGNORE).all()
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    expected_user = seq.gather(spans[:, 0], spans[:, 1], H)
    assert all(torch.equal(batch["user"][k], expected_user[k]) for k in expected_user)
    capped = task.batch(spans, H, max_target_tokens=2)
    assert ((capped["labels"] != IGNORE).sum(1) == 3).all()  # 2 title tokens + EOS


def test_textprompt_histories_have_the_right_length(seq, tok):
    task = NextItem(seq, tok)
    s, e = task.spans(np.array([4]), "test", H)[0].tolist()
    assert "Past movies" not in task.prompt(s, e)  # User-LLM: the history is in the embeddings only
    for k in (1, 3, H):  # TP-k / the short-term part of ARxTPk: the k most recent titles, oldest first
        line = task.prompt(s, e, text_history=k).splitlines()[1]
        assert line == "Past movies, oldest first: " + "; ".join(seq.titles(e - k, e)) + "."
    genre = FavGenre(seq, tok).prompt(s, e, text_history=2).splitlines()[1]
    first = seq.raw_item[e - 2]
    assert genre.startswith(f"Past movies, oldest first: {seq.catalog.title(first)} "
                            f"({', '.join(seq.catalog.genres[first])}); ")


def test_chat_template_is_used_when_the_tokenizer_has_one(seq, tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}")
    task = NextItem(seq, chat, noun="film")
    assert task.prompt(0, 3) == ("[system]Predict the next film the user will choose. Answer with its title "
                                 "only.\n[user]Next film?\n[assistant]")


def test_favgenre_label_matches_the_data_layer(seq, tok):
    task = FavGenre(seq, tok)
    users = np.arange(seq.num_users)
    for split in ("val", "test"):
        spans = task.spans(users, split, seq.max_len)
        assert len(spans) == seq.num_users
        labels = [task.label(s, e) for s, e in spans.tolist()]
        assert labels == seq.favorite_genre(users, split).tolist()
        assert task.target(*spans[0].tolist()) == seq.vocabs["genre"].decode(labels[0])


# ---------------------------------------------------------------- evaluation


def test_list_ranks_and_recall_on_a_hand_checked_case():
    ranked = torch.tensor([[4, 7, 1, 9, 2, 3, 8, 0, 5, 6]] * 4)
    targets = torch.tensor([4, 9, 6, 11])  # first, fourth, tenth, absent
    ranks = list_ranks(ranked, targets)
    assert ranks.tolist() == [0, 3, 9, float("inf")]
    from fed_userllm.eval.ranking import ranking_sums

    means = finalize(ranking_sums(ranks))
    assert means["recall@1"] == 0.25 and means["recall@5"] == 0.5 and means["recall@10"] == 0.75
    assert means["ndcg@10"] == pytest.approx((1 + 1 / np.log2(5) + 1 / np.log2(11)) / 4)


def test_nextitem_constrained_eval_gives_valid_ids_and_counts_duplicate_titles(tok):
    seq = load_sequences(DATA, max_len=10, cache=False)
    vocab = seq.vocabs["item"]
    a, b = vocab.decode(3), vocab.decode(4)
    seq.catalog.titles[b] = seq.catalog.titles[a]  # two items, one title
    task = NextItem(seq, tok)
    trie, group = task.titles
    assert trie.num_distinct == len(vocab) - 3 - 1 and group[a] == group[b]
    model = tiny_userllm(seq, tok)
    with torch.no_grad():
        for block in model.integration.blocks:
            block.gate_attn.fill_(0.5)
    spans = task.spans(np.arange(12), "test", H)
    prompts = [task.prompt(s, e) for s, e in spans.tolist()]
    user = seq.gather(spans[:, 0], spans[:, 1], H)
    ranked = rank(model, tok, prompts, trie, 10, user)
    assert ranked.shape == (12, 10) and ranked.min() >= 0 and ranked.max() < trie.num_distinct
    assert all(len(set(row)) == 10 for row in ranked.tolist())
    sums = evaluate(model, task, spans, H, batch_size=5)
    targets = torch.tensor([group.get(int(seq.raw_item[e]), -2) for e in spans[:, 1].tolist()])
    hits = ranked == targets[:, None]
    assert sums["n"] == 12
    for k in (1, 5, 10):  # recall@k = targets among the first k generated titles (batching does not matter)
        assert sums[f"recall@{k}"] == float(hits[:, :k].any(1).sum())
    for raw in (r for r, g in group.items() if g == ranked[0, 0]):  # any item with the top title is a hit
        seq.raw_item[spans[0, 1]] = raw
        assert task.score(model, prompts[:1], spans[:1], {k: v[:1] for k, v in user.items()})["recall@1"] == 1


def test_text_only_ranking_with_a_prefilled_prompt_cache_is_exact(seq, tok):
    task = NextItem(seq, tok)
    trie, _ = task.titles
    spans = task.spans(np.arange(4), "test", H)
    lengths = (1, 5, 8, 2)  # prompts of different lengths: left padding
    prompts = [task.prompt(s, e, text_history=k) for (s, e), k in zip(spans.tolist(), lengths, strict=True)]
    plain = tiny_llm("gpt2", seed=3, vocab_size=len(tok))
    lora = get_peft_model(tiny_llm("llama", seed=4, vocab_size=len(tok)), LoraConfig(r=4, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at 0; make the adapter matter
        for model in (plain, lora):
            expected = rank_titles(model, tok, prompts, trie, 6)  # beam search without the shared prefill
            assert torch.equal(rank(model, tok, prompts, trie, 6, None), expected)


def test_favgenre_decoding_is_constrained_to_genre_names(seq, tok):
    task = FavGenre(seq, tok)
    model = tiny_userllm(seq, tok, integration="softprompt")
    spans = task.spans(np.arange(10), "test", H)
    ranked = rank(model, tok, [task.prompt(s, e) for s, e in spans.tolist()], task.answer_trie, 3,
                  seq.gather(spans[:, 0], spans[:, 1], H))
    genre_ids = set(task.genre_ids.values())
    assert set(ranked.flatten().tolist()) <= genre_ids
    sums = evaluate(model, task, spans, H)
    labels = torch.tensor([task.label(s, e) for s, e in spans.tolist()])
    assert sums == {"recall@1": float((ranked[:, 0] == labels).sum()), "n": 10.0}


def test_reviewg_rouge_and_generation():
    with pytest.warns(UserWarning):
        data = read_reviews("tests/fixtures/amazon")
    seq = review_sequences(data, max_len=4)
    texts = event_texts(seq, data, "text")
    tok = tiny_tokenizer(texts.tolist() + list(seq.catalog.titles.values()))
    task = ReviewG(seq, tok, texts, max_new_tokens=6)
    got = task.rouge(["the cat sat", "nothing here"], ["the cat sat on the mat", "completely different"])
    assert got["n"] == 2
    assert got["rouge1"] == pytest.approx(2 * 0.5 / 1.5)  # P = 1, R = 3/6
    assert got["rouge2"] == pytest.approx(2 * 0.4 / 1.4)  # P = 2/2, R = 2/5
    assert got["rougeL"] == pytest.approx(2 * 0.5 / 1.5)  # LCS = 3 words
    spans = task.spans(None, "train", 3)
    assert all(texts[e] for e in spans[:, 1])  # only events with a review are targets
    s, e = spans[0].tolist()
    assert task.prompt(s, e).splitlines()[1:3] == [f"Item: {seq.catalog.title(seq.raw_item[e])}",
                                                   f"Rating: {task.rating(e)}/5"]
    model = tiny_userllm(seq, tok)
    sums = evaluate(model, task, task.spans(None, "test", 3), 3)
    assert sums["n"] == 3 and all(0 <= sums[k] <= 3 for k in ReviewG.ROUGE)
    with pytest.raises(ValueError, match="one per event"):
        ReviewG(seq, tok, texts[:-1])


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["xattn", "softprompt", "tp-lora"])
def test_a_few_steps_reduce_the_task_loss(seq, tok, kind):
    task = NextItem(seq, tok)
    spans = task.spans(np.arange(4), "train", H)[:16]
    examples = Examples(task, spans, H, text_history=3 if kind == "tp-lora" else 0)
    if kind == "tp-lora":
        model = get_peft_model(tiny_llm(seed=1, vocab_size=len(tok)), LoraConfig(r=4, task_type="CAUSAL_LM"))
    else:
        model = tiny_userllm(seq, tok, integration=kind)
    fixed = task.batch(spans, H, examples.text_history)
    with torch.no_grad():
        before = task_loss(model.eval(), fixed).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    local_train_steps(model, examples, 30, optimizer, batch_size=8)
    with torch.no_grad():
        after = task_loss(model.eval(), fixed).item()
    assert after < 0.7 * before


# ---------------------------------------------------------------- the catalog objective


def catalog_model(seq, tok, arch="llama", layers=(-1,), strategy="enc", user_tokens="events",
                  encoder_prior=False, open_gates=True) -> UserLLM:
    """A two-layer UserLLM with blocks after ``layers`` and open gates, so the user really changes the scores."""
    model = tiny_userllm(seq, tok, arch=arch, xattn_layers=list(layers), strategy=strategy, user_tokens=user_tokens,
                         perceiver=user_tokens == "events", encoder_prior=encoder_prior)
    with torch.no_grad():
        for block in model.integration.blocks if open_gates else ():
            block.gate_attn.fill_(0.8)
            block.gate_ff.fill_(-0.5)
    return model.eval()


def full_forward_log_probs(model: UserLLM, task: NextItem | FavGenre, spans: np.ndarray) -> torch.Tensor:
    """log P(target answer | catalog) by running the whole model on prompt + answer, renormalizing each step's
    log-probabilities over the tokens the trie allows (what constrained ranking scores)."""
    trie, tok = task.answer_trie, task.tokenizer
    prompt = tok(task.prompt(0, 0))["input_ids"]
    sequences = {items[0]: seq for seq, items in trie.items.items()}
    out = []
    for (s, e), title in zip(spans.tolist(), task.answer_ids(spans).tolist(), strict=True):
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


@pytest.mark.parametrize("arch,user_tokens,kind", [("llama", "events", NextItem), ("gpt2", "events", NextItem),
                                                    ("llama", "next_item", NextItem), ("llama", "events", FavGenre)])
def test_cached_scores_equal_the_full_model(seq, tok, arch, user_tokens, kind):
    task = kind(seq, tok)
    model = catalog_model(seq, tok, arch, user_tokens=user_tokens)
    scorer = CatalogScorer(model, task.answer_trie, task.prompt(0, 0), tok, batch_size=7)
    spans = task.spans(np.arange(12), "test", H)
    with torch.no_grad():
        cached = scorer.log_probs(task.seq.gather(spans[:, 0], spans[:, 1], H), task.answer_ids(spans))
    expected = full_forward_log_probs(model, task, spans)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)
    assert (cached < 0).all() and cached.std() > 0.01  # real, user-dependent probabilities


def test_log_probs_sum_to_one_over_the_catalog(seq, tok):
    task = NextItem(seq, tok)
    model = catalog_model(seq, tok)
    trie = task.titles[0]
    scorer = CatalogScorer.for_task(model, task)
    titles = torch.tensor(sorted(i for items in trie.items.values() for i in items))
    span = task.spans(np.array([5]), "test", H)
    user = {k: v.expand(len(titles), -1) for k, v in task.seq.gather(span[:, 0], span[:, 1], H).items()}
    with torch.no_grad():
        total = scorer.log_probs(user, titles).exp().sum()
    assert abs(total.item() - 1.0) < 1e-4
    assert len(branching_nodes(trie)) < sum(len(s) for s in trie.items)  # only branching nodes are scored


@pytest.mark.parametrize("user_tokens,encoder_prior,kind", [("events", False, NextItem), ("next_item", False, NextItem),
                                                            ("next_item", True, NextItem), ("events", False, FavGenre)])
def test_the_catalog_objective_trains_the_block_and_encoder_only(seq, tok, user_tokens, encoder_prior, kind):
    task = kind(seq, tok)
    model = catalog_model(seq, tok, user_tokens=user_tokens, encoder_prior=encoder_prior)
    frozen = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    scorer = CatalogScorer.for_task(model, task)
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
        CatalogScorer(catalog_model(seq, tok, layers=(0, 1)), trie, prompt, tok)
    with pytest.raises(ValueError, match="strategy='lora'"):
        CatalogScorer(catalog_model(seq, tok, strategy="lora"), trie, prompt, tok)
    prior = catalog_model(seq, tok, user_tokens="next_item", encoder_prior=True)
    with pytest.raises(ValueError, match="encoder_prior needs item_titles"):
        CatalogScorer(prior, trie, prompt, tok)
    with pytest.raises(ValueError, match="item_titles holds title"):
        CatalogScorer(prior, trie, prompt, tok, item_titles=torch.full((seq.vocab_sizes["item"],), 10**6))
    scorer = CatalogScorer.for_task(prior, task)
    tokens, mask = prior.encode_user(task.seq.gather(np.array([0]), np.array([5]), H))
    with pytest.raises(ValueError, match="encoder_prior needs prior="):
        scorer.log_probs_given(tokens, mask, torch.tensor([1]))
    with pytest.raises(ValueError, match="objective='catalog'"):
        ContextualizeConfig(encoder="e", task="reviewg", objective="catalog")
    with pytest.raises(ValueError, match="objective='catalog'"):
        ContextualizeConfig(encoder="e", text_history_len=10, objective="catalog")


def test_xattn_layers_place_the_blocks(seq, tok):
    assert catalog_model(seq, tok, layers=(-1,)).integration.at == [1]
    assert catalog_model(seq, tok, layers=(0, -1, 1)).integration.at == [0, 1]
    with pytest.raises(ValueError, match=r"xattn_layers=\[2\]"):
        catalog_model(seq, tok, layers=(2,))


def test_exact_ranking_orders_every_title_by_its_log_probability(seq, tok):
    task = NextItem(seq, tok)
    model = catalog_model(seq, tok, "gpt2")
    trie = task.titles[0]
    scorer = CatalogScorer.for_task(model, task)
    titles = torch.tensor(sorted(i for items in trie.items.values() for i in items))
    spans = task.spans(np.array([1, 4, 9]), "test", H)
    users = task.seq.gather(spans[:, 0], spans[:, 1], H)
    ranked = scorer.rank(users, k=5)
    for row in range(len(spans)):
        one = {k: v[row:row + 1].expand(len(titles), -1) for k, v in users.items()}
        with torch.no_grad():
            expected = titles[scorer.log_probs(one, titles).topk(5).indices]
        assert ranked[row].tolist() == expected.tolist()


# ---------------------------------------------------------------- the encoder's prior


def encoder_title_probs(model: UserLLM, task: NextItem, users: dict) -> torch.Tensor:
    """The encoder's next-item probabilities over the items that have a title, summed per title [B, titles]."""
    titles = task.item_titles
    with torch.no_grad():
        p = model.encoder.score_items(users)[:, titles >= 0].double().softmax(-1)
    return p.new_zeros(len(p), int(titles.max()) + 1).index_add(1, titles[titles >= 0], p)


def test_with_the_encoder_prior_and_closed_gates_the_model_is_the_encoder(seq, tok):
    task = NextItem(seq, tok)
    model = catalog_model(seq, tok, user_tokens="next_item", encoder_prior=True, open_gates=False)
    scorer = CatalogScorer.for_task(model, task)
    spans = task.spans(np.array([2, 7]), "test", H)
    users = task.seq.gather(spans[:, 0], spans[:, 1], H)
    expected = encoder_title_probs(model, task, users)
    titles = torch.arange(expected.shape[1])
    for row in range(len(spans)):
        one = {k: v[row:row + 1].expand(len(titles), -1) for k, v in users.items()}
        with torch.no_grad():
            got = scorer.log_probs(one, titles).double().exp()
        torch.testing.assert_close(got, expected[row], rtol=1e-4, atol=1e-7)
    assert scorer.rank(users, k=1)[:, 0].tolist() == expected.argmax(1).tolist()
    with pytest.raises(ValueError, match="does not generate"):
        model.generate(users, torch.tensor([[1, 2], [1, 2]]))


def test_with_the_encoder_prior_the_llm_changes_each_branch_by_its_user_logits(seq, tok):
    """Each branching node: log-softmax over the allowed tokens of (LLM logit with the user - without + the
    encoder's conditional log-probability), checked against two full forward passes of the model."""
    task = NextItem(seq, tok)
    model = catalog_model(seq, tok, user_tokens="next_item", encoder_prior=True)
    scorer = CatalogScorer.for_task(model, task)
    trie = task.titles[0]
    prompt = tok(task.prompt(0, 0))["input_ids"]
    paths = {items[0]: list(s) for s, items in trie.items.items()}
    spans = task.spans(np.array([3]), "test", H)
    user = task.seq.gather(spans[:, 0], spans[:, 1], H)
    title_p = encoder_title_probs(model, task, user)[0]
    below = {}  # the encoder's probability of every trie prefix: the sum over the titles that start with it
    for title, path in paths.items():
        for k in range(len(path) + 1):
            below[tuple(path[:k])] = below.get(tuple(path[:k]), 0.0) + float(title_p[title])
    titles = torch.tensor(sorted(paths))
    with torch.no_grad():
        cached = scorer.log_probs({k: v.expand(len(titles), -1) for k, v in user.items()}, titles)
        for title, got in zip(titles.tolist(), cached.tolist(), strict=True):
            path = paths[title]
            ids = torch.tensor([prompt + path[:-1]])
            with_user = model(user, ids).logits[0, len(prompt) - 1:]
            with model.base_llm() as llm:
                without = llm(input_ids=ids).logits[0, len(prompt) - 1:]
            total = 0.0
            for k, token in enumerate(path):
                allowed = trie.allowed(path[:k])
                prior = torch.tensor([math.log(below[tuple(path[:k] + [t])] / below[tuple(path[:k])])
                                      for t in allowed])
                z = with_user[k, allowed] - without[k, allowed] + prior
                total += z.log_softmax(-1)[allowed.index(token)].item()
            assert got == pytest.approx(total, abs=1e-4)
    assert abs(cached.exp().sum().item() - 1.0) < 1e-4
    assert not torch.allclose(cached.exp().double(), title_p[titles], atol=1e-3)  # the open gates matter


def test_the_encoder_prior_needs_the_catalog_objective():
    with pytest.raises(ValueError, match="objective='catalog'"):
        ContextualizeConfig(encoder="e", encoder_prior=True)
    config = ContextualizeConfig(encoder="e", encoder_prior=True, objective="catalog", xattn_layers=[-1],
                                 user_tokens="next_item", perceiver=False)
    assert config.userllm_config().encoder_prior
