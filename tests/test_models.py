"""User encoders: shapes, padding invariance, causality, tied weights, save/load, learning, input errors."""

import pytest
import torch
import torch.nn.functional as F
from encoder_fixtures import MAX_LEN, VOCAB, make_batch, tiny
from safetensors.torch import load_file

from fed_userllm.data.vocab import MASK_ID, NUM_RESERVED, PAD_ID
from fed_userllm.models import (
    ARUserEncoder,
    BERT4Rec,
    DualEncoder,
    Popularity,
    PopularityConfig,
    load_pretrained,
)
from fed_userllm.models.ar_encoder import SEEN_SCALE

ENCODERS = [ARUserEncoder, DualEncoder, BERT4Rec]


def pad_to(batch, T, junk_seed):
    """Extra padded columns up to T; every padded position gets a random id (its mask stays False)."""
    g = torch.Generator().manual_seed(junk_seed)
    mask = F.pad(batch["mask"], (0, T - batch["mask"].shape[1]), value=False)
    out = {"mask": mask}
    for f in ("item", "genre", "rating"):
        junk = torch.randint(0, VOCAB[f], mask.shape, generator=g)
        out[f] = torch.where(mask, F.pad(batch[f], (0, T - batch[f].shape[1]), value=PAD_ID), junk)
    return out


@pytest.mark.parametrize("cls", ENCODERS)
def test_shapes_and_finite_scores(cls):
    torch.manual_seed(0)
    model = tiny(cls)
    batch = make_batch([7, 3, 1, 7], T=7)
    h = model.encode(batch)
    expected = (4, 2, 16) if cls is DualEncoder else (4, 7, 16)
    assert h.shape == expected and torch.isfinite(h).all()
    loss = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    scores = model.score_items(batch)
    assert scores.shape == (4, VOCAB["item"]) and torch.isfinite(scores).all()


def test_ar_genre_logits():
    model = tiny(ARUserEncoder).eval()
    batch = make_batch([4, 2], T=5)
    assert model.next_logits(batch, "genre").shape == (2, VOCAB["genre"])
    both = model.next_scores(batch, ("item", "genre"))  # one pass gives what separate calls give
    torch.testing.assert_close(both["genre"], model.next_logits(batch, "genre"), rtol=0, atol=0)
    torch.testing.assert_close(both["item"], model.score_items(batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="feature='tag'"):
        model.next_logits(make_batch([4, 2], T=5), "tag")


@pytest.mark.parametrize("cls", ENCODERS)
def test_padding_never_changes_real_events(cls):
    torch.manual_seed(0)
    model = tiny(cls).eval()
    batch = make_batch([6, 2, 4], T=6)
    padded = pad_to(batch, 10, junk_seed=1)
    assert (padded["item"][~padded["mask"]] != PAD_ID).any()
    with torch.no_grad():
        if cls is not DualEncoder:
            torch.testing.assert_close(model.encode(padded)[:, :6][batch["mask"]],
                                       model.encode(batch)[batch["mask"]], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(model.encode(padded), model.encode(batch), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.score_items(padded), model.score_items(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [ARUserEncoder, DualEncoder])
def test_causal_encoders_never_look_ahead(cls):
    torch.manual_seed(0)
    model = tiny(cls).eval()
    states = model.encode if cls is ARUserEncoder else model.user_states
    batch = make_batch([8, 8], T=8)
    changed = {k: v.clone() for k, v in batch.items()}
    j = 5
    for f in ("item", "genre", "rating"):
        changed[f][:, j] = NUM_RESERVED + (batch[f][:, j] + 1 - NUM_RESERVED) % (VOCAB[f] - NUM_RESERVED)
    with torch.no_grad():
        before, after = states(batch), states(changed)
    torch.testing.assert_close(after[:, :j], before[:, :j], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, j], before[:, j], atol=1e-4)


def test_bert4rec_is_bidirectional():
    model = tiny(BERT4Rec).eval()
    batch = make_batch([8], T=8)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["item"][0, 6] = NUM_RESERVED + (batch["item"][0, 6] + 1 - NUM_RESERVED) % (VOCAB["item"] - NUM_RESERVED)
    with torch.no_grad():
        assert not torch.allclose(model.encode(changed)[0, 0], model.encode(batch)[0, 0], atol=1e-4)


def tied_pairs(model):
    if isinstance(model, ARUserEncoder):
        return [(model.embed[f].weight, model.unembed[f].weight) for f in model.config.features]
    return [(model.embed["item"].weight, model.unembed.weight)]


@pytest.mark.parametrize("cls", [ARUserEncoder, BERT4Rec])
def test_tied_weights_share_storage_and_survive_loading(cls, tmp_path):
    model = tiny(cls)
    for emb, out in tied_pairs(model):
        assert out is emb
    with torch.no_grad():
        model.embed["item"].weight.add_(torch.randn_like(model.embed["item"].weight))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    out_name = "unembed.item.weight" if cls is ARUserEncoder else "unembed.weight"
    assert ("embed.item.weight" in stored) + (out_name in stored) == 1  # the tied table is stored once
    loaded = cls.from_pretrained(tmp_path)
    for emb, out in tied_pairs(loaded):
        assert out is emb
    assert torch.equal(tied_pairs(loaded)[0][1], model.embed["item"].weight)  # loaded values, not a fresh init


@pytest.mark.parametrize("cls", [*ENCODERS, Popularity])
def test_save_load_round_trip(cls, tmp_path):
    torch.manual_seed(0)
    batch = make_batch([5, 2, 3], T=5)
    if cls is Popularity:
        model = Popularity(PopularityConfig(VOCAB)).fit(batch["item"])
    else:
        model = tiny(cls)
        with torch.no_grad():  # move every weight (biases start at zero) so the test compares real values
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path)
    for loaded in (cls.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert type(loaded) is cls and loaded.config == model.config and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded.score_items(batch), model.score_items(batch))
            if cls is not Popularity:
                assert torch.equal(loaded.encode(batch), model.encode(batch))
    other = DualEncoder if cls is ARUserEncoder else ARUserEncoder
    with pytest.raises(ValueError, match="model_type"):
        other.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("cls", "pattern"),
    # BERT4Rec gets "repeat": recovering a masked successor needs relative-position attention, which takes
    # hundreds of steps to emerge; the causal models get "successor", which also catches an off-by-one shift.
    [(ARUserEncoder, "successor"), (DualEncoder, "successor"), (BERT4Rec, "repeat")],
)
def test_loss_decreases_on_a_learnable_task(cls, pattern):
    torch.manual_seed(0)
    model = tiny(cls, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(80):
        lengths = torch.randint(2, MAX_LEN + 1, (16,), generator=gen).tolist()
        loss = model.loss(make_batch(lengths, T=MAX_LEN, seed=step, pattern=pattern))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5
    model.eval()
    test = make_batch(torch.randint(1, MAX_LEN, (32,), generator=gen).tolist(), T=MAX_LEN - 1, seed=999,
                      pattern=pattern)
    with torch.no_grad():
        top1 = model.score_items(test)[:, NUM_RESERVED:].argmax(1) + NUM_RESERVED
    last = test["item"][torch.arange(32), test["mask"].sum(1) - 1]
    step = 1 if pattern == "successor" else 0
    assert torch.equal(top1, NUM_RESERVED + (last + step - NUM_RESERVED) % (VOCAB["item"] - NUM_RESERVED))


def test_seen_offset_moves_exactly_the_history_items():
    torch.manual_seed(0)
    model = tiny(ARUserEncoder, seen_offset=True).eval()
    batch = make_batch([5, 2, 9], T=9)
    with torch.no_grad():
        plain = model.score_items(batch)
        model.seen.weight.fill_(-0.7)
        shifted = model.score_items(batch)
    expected = torch.zeros_like(plain)
    for row in range(3):
        history = batch["item"][row][batch["mask"][row]]
        expected[row, history] = -0.7 * SEEN_SCALE  # padding (id 0) is not in the history
    torch.testing.assert_close(shifted - plain, expected, atol=1e-5, rtol=0)


def test_seen_offset_in_training_covers_only_the_events_so_far():
    """Position t predicts event t + 1 with the items of events 0..t marked seen (a loop as the reference)."""
    torch.manual_seed(0)
    model = tiny(ARUserEncoder, seen_offset=True, dropout=0.0, loss_weights={"item": 1.0, "genre": 1e-9,
                                                                             "rating": 1e-9}).eval()
    batch = make_batch([7, 4], T=7, seed=3)
    batch["item"][0, 4] = batch["item"][0, 1]  # a repeat: seen at t >= 1, the target of position 3
    with torch.no_grad():
        model.seen.weight.fill_(-0.4)
        h = model.encode(batch)
        rows = []
        for row in range(2):
            n = int(batch["mask"][row].sum())
            nll = []
            for t in range(n - 1):
                logits = model.logits(h[row, t], "item").clone()
                logits[batch["item"][row, :t + 1]] += -0.4 * SEEN_SCALE
                nll.append(F.cross_entropy(logits[NUM_RESERVED:], batch["item"][row, t + 1] - NUM_RESERVED))
            rows.append(torch.stack(nll).mean())
        torch.testing.assert_close(model.loss(batch), torch.stack(rows).mean(), atol=1e-4, rtol=1e-4)


def test_seen_offset_learns_that_items_do_not_repeat():
    """Rows are random permutations (no item twice): the offset turns negative and the top item is never seen."""
    torch.manual_seed(0)
    model = tiny(ARUserEncoder, seen_offset=True, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    n_items = VOCAB["item"] - NUM_RESERVED

    def permutations(rows: int) -> dict:
        batch = make_batch([MAX_LEN] * rows, T=MAX_LEN, seed=int(torch.randint(1000, (1,), generator=gen)))
        batch["item"] = torch.stack([torch.randperm(n_items, generator=gen)[:MAX_LEN] for _ in range(rows)])
        batch["item"] += NUM_RESERVED
        return batch

    for _ in range(40):
        loss = model.loss(permutations(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.seen.weight.item() * SEEN_SCALE < -2.0
    test = permutations(32)
    with torch.no_grad():
        top = model.eval().score_items(test)[:, NUM_RESERVED:].argmax(1) + NUM_RESERVED
    assert not (top[:, None] == test["item"]).any()


@pytest.mark.parametrize("cls", ENCODERS)
def test_bad_batches_raise(cls):
    model = tiny(cls)
    batch = make_batch([3, 2], T=4)
    with pytest.raises(ValueError, match="missing \\['genre'\\]"):
        model.encode({k: v for k, v in batch.items() if k != "genre"})
    with pytest.raises(ValueError, match=f"T={MAX_LEN + 1}.*max_len={MAX_LEN}"):
        model.encode(make_batch([3], T=MAX_LEN + 1))
    with pytest.raises(ValueError, match="mask"):
        model.encode({**batch, "mask": batch["mask"].long()})
    with pytest.raises(ValueError, match="right-padded"):
        model.encode({**batch, "mask": batch["mask"].flip(1)})
    with pytest.raises(ValueError, match="'item'.*shape"):
        model.encode({**batch, "item": batch["item"][:, :2]})


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (ARUserEncoder, {"vocab_sizes": {"item": 23, "genre": 7}}, "vocab_sizes\\['rating'\\]"),
        (ARUserEncoder, {"n_heads": 3}, "divisible"),
        (ARUserEncoder, {"loss_weights": {"item": 1.0}}, "loss_weights"),
        (ARUserEncoder, {"loss_weights": {"item": 1.0, "genre": 0.0, "rating": 1.0}}, "positive"),
        (ARUserEncoder, {"features": ("genre",), "feature_dims": {"genre": 8}}, "including 'item'"),
        (ARUserEncoder, {"label_smoothing": 1.0}, "label_smoothing"),
        (DualEncoder, {"label_weights": {"item": 1.0, "tag": 1.0}}, "label_weights"),
        (DualEncoder, {"num_user_embeddings": 0}, "num_user_embeddings"),
        (BERT4Rec, {"mask_prob": 0.0}, "mask_prob"),
    ],
)
def test_bad_configs_raise(cls, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(cls, **overrides)


def test_bert4rec_masks_only_real_events():
    model = tiny(BERT4Rec)
    batch = make_batch(torch.randint(1, MAX_LEN + 1, (400,), generator=torch.Generator().manual_seed(0)).tolist(),
                       T=MAX_LEN)
    masked = model.sample_mask(batch, torch.Generator().manual_seed(1))
    assert not (masked & ~batch["mask"]).any() and masked.any(1).all()
    rate = masked.sum() / batch["mask"].sum()
    assert 0.18 < rate < 0.27  # 0.2 plus the forced mask in rows that drew none
    with pytest.raises(ValueError, match="real events only"):
        model.masked_item_loss(batch, ~batch["mask"])


def test_bert4rec_full_row_drops_its_oldest_event():
    model = tiny(BERT4Rec).eval()
    full = make_batch([MAX_LEN], T=MAX_LEN)
    shorter = {k: v[:, 1:] for k, v in full.items()}  # same row without its oldest event, T = max_len - 1
    with torch.no_grad():
        torch.testing.assert_close(model.score_items(full), model.score_items(shorter), atol=1e-5, rtol=0)
    assert MASK_ID not in full["item"]


def test_popularity_counts_real_items():
    model = Popularity(PopularityConfig(VOCAB))
    model.fit(torch.tensor([[5, 5, 7, PAD_ID], [5, MASK_ID, 1, PAD_ID]]))
    scores = model.score_items(make_batch([2, 1, 1], T=2))
    assert scores.shape == (3, VOCAB["item"])
    assert scores[0, 5] == 3 and scores[0, 7] == 1 and scores[:, :NUM_RESERVED].sum() == 0
    scores[0, 5] = -1  # callers may edit their copy
    assert model.counts[5] == 3
    with pytest.raises(ValueError, match="0..22"):
        model.fit(torch.tensor([VOCAB["item"]]))


def test_ar_encoder_exports_with_dynamic_batch_and_length():
    model = tiny(ARUserEncoder).eval()
    batch = make_batch([6, 3, 6], T=6)
    dims = {0: torch.export.Dim("B", min=1, max=64), 1: torch.export.Dim("T", min=2, max=MAX_LEN)}
    program = torch.export.export(model, (batch,), dynamic_shapes=({k: dims for k in batch},))
    other = make_batch([9, 2], T=9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other), atol=1e-5, rtol=0)
