"""Opacus per-sample gradients of every encoder equal the true per-sample gradients (tied tables included).

DP-SGD clips each sample's gradient, so a parameter whose per-sample gradient is missing, mis-shaped or
mixes samples silently breaks the privacy guarantee. For every trainable parameter we check that Opacus'
``grad_sample[i]`` equals the gradient of sample i's loss computed alone, and that their mean equals the
ordinary batch gradient (the losses are means over rows, ``loss_reduction="mean"``).
"""

import pytest
import torch
from encoder_fixtures import make_batch, tiny
from opacus import GradSampleModule

from fed_userllm.models import ARUserEncoder, BERT4Rec, DualEncoder
from fed_userllm.models.layers import attention_mask

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def per_sample_mismatches(model, batch, loss_fn):
    """Names of parameters whose Opacus per-sample gradient is wrong.

    ``loss_fn(batch, rows)`` is the model's row-mean loss on ``batch``, which holds rows ``rows`` of the full
    batch (BERT4Rec needs that to reuse one fixed masking).
    """
    B = batch["mask"].shape[0]
    alone = []
    for i in range(B):
        model.zero_grad()
        loss_fn({k: v[i:i + 1] for k, v in batch.items()}, slice(i, i + 1)).backward()
        alone.append({n: p.grad.clone() for n, p in model.named_parameters()})
    GradSampleModule(model, loss_reduction="mean")
    model.zero_grad()
    loss_fn(batch, slice(None)).backward()
    bad = []
    for name, p in model.named_parameters():
        gs = p.grad_sample
        if not (isinstance(gs, torch.Tensor) and gs.shape == (B, *p.shape)
                and torch.allclose(gs.mean(0), p.grad, atol=1e-5)
                and all(torch.allclose(gs[i], alone[i][name], atol=1e-5) for i in range(B))):
            bad.append(name)
    return bad


def loss_fn(model):
    if isinstance(model, BERT4Rec):  # one fixed masking, so the batch and each row alone see the same mask
        masked = model.sample_mask(BATCH, torch.Generator().manual_seed(0))
        return lambda batch, rows: model.masked_item_loss(batch, masked[rows])
    return lambda batch, rows: model.loss(batch)


BATCH = make_batch([9, 5, 2, 7], T=9)


@pytest.mark.parametrize("cls", [ARUserEncoder, DualEncoder, BERT4Rec])
def test_opacus_per_sample_gradients_are_exact(cls):
    torch.manual_seed(0)
    model = tiny(cls, dropout=0.0)  # dropout would differ between the batch and the single-row passes
    model.train()
    names = {n for n, _ in model.named_parameters()}
    assert "embed.item.weight" in names  # the tied table (also the output layer, listed once)
    assert per_sample_mismatches(model, BATCH, loss_fn(model)) == []


def test_opacus_per_sample_gradients_are_exact_with_public_item_features():
    """The frozen feature table gets no gradient; the projection, the query head and the per-item bias do."""
    torch.manual_seed(0)
    config = tiny(ARUserEncoder).config
    config.item_features, config.public_feature_dim = "public", 5
    model = ARUserEncoder(config, torch.randn(config.vocab_sizes["item"], 5))
    with torch.no_grad():
        model.heads["item"].weight.normal_()  # zero at init: make the query (and its gradient paths) non-trivial
    model.train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"embed.item.proj.weight", "unembed.item.bias", "heads.item.weight"} <= names
    assert not any("features" in n for n in names)
    model.drop.p = 0.0
    for block in model.transformer.blocks:
        block.drop.p, block.attn.dropout = 0.0, 0.0
    assert per_sample_mismatches(model, BATCH, loss_fn(model)) == []


class RawMatmulHead(ARUserEncoder):
    """Broken tie: output logits use the table outside any hooked module."""

    def logits(self, h, feature):
        return self.heads[feature](h) @ self.embed[feature].weight.T + self.unembed[feature].bias


class SharedPositions(ARUserEncoder):
    """Broken positions: one [1, T] lookup broadcast over the batch."""

    def encode(self, batch):
        x = torch.cat([self.embed[f](batch[f]) for f in self.config.features], dim=-1)
        x = self.fuse(x) + self.pos(torch.arange(x.shape[1])[None])
        return self.transformer(x, attention_mask(batch["mask"], causal=True))


@pytest.mark.parametrize(("cls", "broken"), [(RawMatmulHead, "embed.item.weight"), (SharedPositions, "pos.weight")])
def test_the_check_catches_broken_models(cls, broken):
    torch.manual_seed(0)
    model = tiny(cls, dropout=0.0)
    model.train()
    assert broken in per_sample_mismatches(model, BATCH, loss_fn(model))


def test_opacus_per_sample_gradients_are_exact_with_the_seen_offset_and_label_smoothing():
    torch.manual_seed(0)
    model = tiny(ARUserEncoder, dropout=0.0, seen_offset=True, label_smoothing=0.1)
    with torch.no_grad():
        model.seen.weight.fill_(-0.3)  # zero at init: make its gradient paths non-trivial
    model.train()
    assert "seen.weight" in {n for n, _ in model.named_parameters()}
    assert per_sample_mismatches(model, BATCH, loss_fn(model)) == []
