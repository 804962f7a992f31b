"""The TextPrompt baseline as its own model: what trains per strategy, calls passed to the LLM, the model folder
(save / load round trip) and the errors that name what is wrong."""

import pytest
import torch
from llm_fixtures import tiny_llm

from fed_userllm.models.llm import load_llm
from fed_userllm.models.textprompt import CONFIG_NAME, WEIGHTS_NAME, TextPromptConfig, TextPromptLLM

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


def trained(tiny_llm_dir: str, strategy: str) -> TextPromptLLM:
    """A TextPrompt model over the saved tiny LLM whose every trainable weight moved away from its start."""
    torch.manual_seed(0)
    model = TextPromptLLM(TextPromptConfig(llm=tiny_llm_dir, strategy=strategy, history_len=5, lora_r=4),
                          load_llm(tiny_llm_dir, device="cpu")[0])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_strategy_trains_lora_adapters_or_every_weight(tiny_llm_dir, strategy):
    model = trained(tiny_llm_dir, strategy)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if strategy == "full":
        assert names == [n for n, _ in model.named_parameters()]
    else:
        assert names and all("lora_" in n for n in names)
    out = model(input_ids=IDS, labels=IDS)
    assert torch.equal(out.logits, model.llm(input_ids=IDS).logits) and torch.isfinite(out.loss)
    new = model.generate(input_ids=IDS, max_new_tokens=2, do_sample=False)
    assert new.shape == (2, 6) and torch.equal(new[:, :4], IDS)  # HF generate: the prompt, then the new tokens


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_save_load_round_trip(tmp_path, tiny_llm_dir, strategy):
    model = trained(tiny_llm_dir, strategy)
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() == (strategy == "lora")  # PEFT's
    assert (tmp_path / WEIGHTS_NAME).is_file() == (strategy == "full")
    loaded = TextPromptLLM.from_pretrained(tmp_path, device="cpu")  # the base LLM from config.llm
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
        assert not torch.equal(loaded(input_ids=IDS).logits, load_llm(tiny_llm_dir, device="cpu")[0](
            input_ids=IDS).logits)  # the trained weights, not the base LLM's


def test_errors_name_what_is_wrong(tmp_path, tiny_llm_dir):
    with pytest.raises(ValueError, match="strategy='enc': the TextPrompt baseline has no encoder or projection"):
        TextPromptConfig(strategy="enc")
    with pytest.raises(ValueError, match="history_len=0"):
        TextPromptConfig(history_len=0)
    trained(tiny_llm_dir, "lora").save_pretrained(tmp_path / "tp")
    with pytest.raises(ValueError, match="does not match the saved"):
        TextPromptLLM.from_pretrained(tmp_path / "tp", llm=tiny_llm("gpt2"))
    with pytest.raises(FileNotFoundError, match=f"not a TextPrompt model folder \\(no {CONFIG_NAME}"):
        TextPromptLLM.from_pretrained(tiny_llm_dir)  # a bare LLM folder, as TextPrompt runs once saved
