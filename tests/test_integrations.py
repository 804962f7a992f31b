"""The two integrations as objects: one interface (trainable layers, token width, forward / generate with user
tokens, the user switched off, names of older folders), chosen by name, and old User-LLM folders still loading."""

import pytest
import torch
from llm_fixtures import VOCAB, make, set_gates, text, tiny_llm, user_batch
from safetensors.torch import load_file, save_file

from fed_userllm.models.integrations import (
    INTEGRATIONS,
    CrossAttentionIntegration,
    GatedCrossAttention,
    SoftPromptIntegration,
)
from fed_userllm.models.userllm import WEIGHTS_NAME, UserLLM, UserLLMConfig
from fed_userllm.settings import INTEGRATION_NAMES

HIDDEN = 32  # tiny_llm's hidden size


def config(**overrides) -> UserLLMConfig:
    fields = dict(llm="unused", xattn_every=1, xattn_dim=16, n_xattn_heads=2, num_task_prompt_tokens=3)
    return UserLLMConfig(**fields | overrides)


def user_tokens(dim: int, lengths=(4, 2), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(len(lengths), max(lengths), dim, generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]


def test_the_registry_builds_every_named_integration():
    assert tuple(INTEGRATIONS) == INTEGRATION_NAMES
    assert INTEGRATIONS["xattn"] is CrossAttentionIntegration and INTEGRATIONS["softprompt"] is SoftPromptIntegration
    for name, integration in INTEGRATIONS.items():
        model = make(integration=name)
        assert type(model.integration) is integration
        assert model.projection(torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))[0].shape[-1] == (
            integration.token_dim(model.config, HIDDEN))


def test_cross_attention_owns_one_gated_block_per_position_and_its_hooks():
    llm = tiny_llm(layers=3)
    integration = CrossAttentionIntegration(config(xattn_layers=[0, -1]), llm)
    assert integration.at == [0, 2] and len(integration.blocks) == 2
    assert all(isinstance(b, GatedCrossAttention) for b in integration.blocks)
    assert {n.split(".")[0] for n, _ in integration.named_parameters()} == {"blocks"}
    assert CrossAttentionIntegration.token_dim(config(), HIDDEN) == 16
    with pytest.raises(RuntimeError, match="need user embeddings"):  # the hooks are on the LLM's layers
        llm(input_ids=torch.tensor([[5, 6]]))


def test_cross_attention_forward_generate_and_without_user():
    llm = tiny_llm()
    ids, mask = text()
    with torch.no_grad():
        integration = CrossAttentionIntegration(config(), llm)
        with integration.without_user():
            base = llm(input_ids=ids, attention_mask=mask).logits
        tokens, user_mask = user_tokens(16)
        assert torch.equal(integration(llm, tokens, user_mask, ids, mask, None).logits, base)  # gates at 0
        for block in integration.blocks:
            block.gate_attn.fill_(0.5)
        out = integration(llm, tokens, user_mask, ids, mask, ids)
        assert not torch.allclose(out.logits, base, atol=1e-4) and torch.isfinite(out.loss)
        with integration.without_user():
            assert torch.equal(llm(input_ids=ids, attention_mask=mask).logits, base)
    assert all(block.user is None and not block.bypass for block in integration.blocks)

    seen = []
    new = integration.generate(llm, tokens, user_mask, ids, mask, max_new_tokens=3, do_sample=False,
                               pad_token_id=0, prefix_allowed_tokens_fn=lambda i, t: seen.append(len(t)) or [7, 8])
    assert new.shape == (2, 3) and set(new.flatten().tolist()) <= {7, 8}
    assert min(seen) == 0 and max(seen) == 2  # the function saw only the generated tokens, not the prompt


def test_soft_prompt_prefixes_user_tokens_and_task_prompt():
    llm = tiny_llm()
    integration = SoftPromptIntegration(config(), llm)
    assert [(n, tuple(p.shape)) for n, p in integration.named_parameters()] == [("task_prompt", (3, HIDDEN))]
    assert SoftPromptIntegration.token_dim(config(), HIDDEN) == HIDDEN
    ids, mask = text()
    tokens, user_mask = user_tokens(HIDDEN)
    with torch.no_grad():
        out = integration(llm, tokens, user_mask, ids, mask, ids)
        prefix = tokens.shape[1] + 3
        assert out.logits.shape == (2, prefix + ids.shape[1], VOCAB)
        labels = ids.masked_fill(mask == 0, -100)
        expected = torch.nn.functional.cross_entropy(out.logits[:, prefix - 1:-1].reshape(-1, VOCAB),
                                                     labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(integration(llm, tokens, user_mask, ids, mask, labels).loss, expected)
        alone = llm(input_ids=ids, attention_mask=mask).logits  # the LLM alone never sees the user
        with integration.without_user():
            assert torch.equal(llm(input_ids=ids, attention_mask=mask).logits, alone)
    seen = []
    new = integration.generate(llm, tokens, user_mask, ids, mask, max_new_tokens=3, do_sample=False,
                               pad_token_id=0, prefix_allowed_tokens_fn=lambda i, t: seen.append(len(t)) or [7, 8])
    assert new.shape == (2, 3) and set(new.flatten().tolist()) <= {7, 8}
    assert min(seen) == 0 and max(seen) == 2


def test_upgrade_names_renames_only_the_integration_tensors():
    old = {"xattn.0.gate_attn": 1, "projection.mlp.0.weight": 2, "task_prompt": 3}
    assert CrossAttentionIntegration.upgrade_names(old) == {"integration.blocks.0.gate_attn": 1,
                                                            "projection.mlp.0.weight": 2, "task_prompt": 3}
    assert SoftPromptIntegration.upgrade_names(old) == {"xattn.0.gate_attn": 1, "projection.mlp.0.weight": 2,
                                                        "integration.task_prompt": 3}


@pytest.mark.parametrize("integration,old_prefix", [("xattn", "xattn."), ("softprompt", "task_prompt")])
def test_folders_written_before_the_integrations_were_objects_still_load(tmp_path, integration, old_prefix):
    model = make("llama", seed=2, integration=integration)
    if integration == "xattn":
        set_gates(model, 0.4)
    with torch.no_grad():
        model.projection.mlp[0].weight.add_(0.1)
    model.save_pretrained(tmp_path)
    new_prefix = INTEGRATIONS[integration].legacy_names[1]
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert any(k.startswith(new_prefix) for k in saved)
    save_file({old_prefix + k[len(new_prefix):] if k.startswith(new_prefix) else k: v for k, v in saved.items()},
              str(tmp_path / WEIGHTS_NAME))  # the names the folder had before
    loaded = UserLLM.from_pretrained(tmp_path, llm=tiny_llm("llama", seed=2))
    users, (ids, mask) = user_batch([6, 3]), text()
    with torch.no_grad():
        assert torch.equal(loaded(users, ids, mask).logits, model(users, ids, mask).logits)
