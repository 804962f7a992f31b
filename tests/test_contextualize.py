"""Local phase-two trainer: run directory, resume, TextPrompt baselines, federated building blocks."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import fed_userllm.train.contextualize as ctx
from fed_userllm.data.reviews import read_reviews, review_sequences
from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.textprompt import TextPromptLLM
from fed_userllm.rundir import RunDir
from fed_userllm.serving.model import ServedModel
from fed_userllm.train.centralized import pretrain
from fed_userllm.train.contextualize import (
    contextualize,
    evaluate_llm,
    make_optimizer,
    prepare,
)
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.pretrain_config import PretrainConfig
from fed_userllm.train.steps import Examples, load_trainable_state, local_train_steps, trainable_state

DATA = "synthetic:users=40,items=30,seed=1"


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llm_dir):
    """A pretrained tiny encoder run and a tiny LLM folder, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("runs")
    settings = PretrainConfig(dataset=DATA, max_len=10, d_model=16, n_layers=1, n_heads=2, epochs=1,
                              batch_size=32, dropout=0.0, device="cpu")
    pretrain(settings, root / "enc", progress=False)
    return {"encoder": str(root / "enc"), "llm": tiny_llm_dir}


def config(runs, **overrides) -> ContextualizeConfig:
    settings = dict(encoder=runs["encoder"], llm=runs["llm"], history_len=8, num_latents=4, steps=6,
                    batch_size=4, lr=1e-2, eval_users=6, checkpoint_every=2, device="cpu")
    return ContextualizeConfig(**settings | overrides)


def test_run_directory_results_and_evaluate_llm(runs, tmp_path):
    results = contextualize(config(runs, eval_every=3), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["integration"] == "xattn"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [6]
    assert [x["step"] for x in lines if "val_recall@10" in x] == [3]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
    assert (run / "userllm" / "userllm_config.json").is_file() and (run / "userllm" / "encoder").is_dir()
    assert (tmp_path / "latest").resolve() == run.resolve()
    assert results["val"]["n"] == results["test"]["n"] == 6
    test = results["test"]
    assert 0 <= test["recall@1"] <= test["recall@5"] <= test["recall@10"] <= 1
    assert json.loads((run / "results.json").read_text())["test"] == results["test"]
    # the saved model reproduces the run's own test metrics
    assert evaluate_llm(run, "test", device="cpu", progress=False) == results["test"]
    assert evaluate_llm(run, "val", num_users=3, device="cpu", progress=False)["n"] == 3


def test_resume_after_a_crash_gives_the_same_model(runs, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    contextualize(config(runs, eval_users=0), straight, progress=False)
    real, calls = ctx.local_train_steps, {"n": 0}

    def crash_on_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # steps 4-5: the checkpoint of step 4 is on disk
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ctx, "local_train_steps", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        contextualize(config(runs, eval_users=0), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(ctx, "local_train_steps", real)
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)["step"] == 4
    with pytest.raises(FileExistsError, match="--resume"):
        contextualize(config(runs, eval_users=0), tmp_path / "crashed", progress=False)
    with pytest.raises(ValueError, match="same settings"):
        contextualize(config(runs, eval_users=0, lr=1e-3), tmp_path / "crashed", resume=True, progress=False)
    contextualize(config(runs, eval_users=0), tmp_path / "crashed", resume=True, progress=False)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [6]  # nothing logged twice


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_textprompt_baselines_train_save_and_reload(runs, tmp_path, strategy):
    cfg = config(runs, method="textprompt", strategy=strategy, history_len=5, text_history_len=5, steps=2,
                 task="favgenre")
    results = contextualize(cfg, tmp_path / strategy, progress=False)
    model, task = prepare(cfg)
    llm_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    if strategy == "full":
        assert results["trainable_parameters"] == llm_params
    else:
        assert 0 < results["trainable_parameters"] < llm_params / 4
    assert isinstance(model, TextPromptLLM) and model.config.history_len == 5 and task.name == "favgenre"
    assert evaluate_llm(tmp_path / strategy, "test", device="cpu", progress=False) == results["test"]
    with pytest.raises(ValueError, match="a TextPrompt baseline .* takes no embeddings"):
        ServedModel.load(tmp_path / strategy / "userllm", device="cpu")


def test_long_plus_short_and_soft_prompt_variants(runs, tmp_path):
    cfg = config(runs, integration="softprompt", perceiver=False, text_history_len=3, steps=2)
    results = contextualize(cfg, tmp_path / "ar8tp3", progress=False)
    model, task = prepare(config(runs, integration="softprompt", perceiver=False, text_history_len=3))
    assert results["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    names = model.trainable_parameter_names()
    assert names and all(n.startswith(("encoder.", "projection.", "integration.task_prompt")) for n in names)
    assert "Past movies" in task.prompt(0, 5, 3) and results["test"]["n"] == 6


def test_reviewg_on_an_amazon_folder(runs, tmp_path):
    with pytest.warns(UserWarning):
        seq = review_sequences(read_reviews("tests/fixtures/amazon"), max_len=4)
    encoder = ARUserEncoder(ARUserEncoderConfig(vocab_sizes=seq.vocab_sizes, d_model=16, n_layers=1,
                                                n_heads=2, max_len=5))
    encoder.save_pretrained(tmp_path / "enc" / "best")  # an (untrained) encoder run for the review dataset
    run = {"dataset": "tests/fixtures/amazon", "max_len": 4}
    (tmp_path / "enc" / "config.json").write_text(json.dumps(run))
    cfg = config(runs, encoder=str(tmp_path / "enc"), task="reviewg", review_field="summary", history_len=4,
                 steps=2, max_target_tokens=5)
    with pytest.warns(UserWarning):
        results = contextualize(cfg, tmp_path / "run", progress=False)
    assert set(results["test"]) == {"rouge1", "rouge2", "rougeL", "n"} and results["test"]["n"] == 3
    with pytest.raises(ValueError, match="needs review text"):
        contextualize(config(runs, task="reviewg"), tmp_path / "ml", progress=False)


def test_federated_building_blocks(runs):
    model, task = prepare(config(runs))
    spans = task.spans(np.arange(5), "train", 8)
    examples = Examples(task, spans, 8)
    start = trainable_state(model)
    assert set(start) == set(model.trainable_parameter_names())

    def train(steps_per_call: list[int], micro: int | None = None, optimizer_class=torch.optim.AdamW) -> dict:
        load_trainable_state(model, start)
        optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        step, losses = 0, []
        for n in steps_per_call:
            loss = local_train_steps(model, examples, n, optimizer, batch_size=4, seed=7, start_step=step,
                                     micro_batch_size=micro)
            losses.append(loss)
            step += n
        assert all(np.isfinite(losses))
        return trainable_state(model)

    once, split = train([4]), train([1, 3])  # the same steps, split across calls (rounds)
    assert all(torch.equal(once[k], split[k]) for k in once)
    # Gradient accumulation over 4 micro-batches takes the same steps up to float summation order. Compared
    # under plain SGD: an update is lr * gradient, so a relative gradient error of a few float32 ulps (~1e-6)
    # moves a parameter by ~lr * |g| * 1e-6 << 1e-6. (Adam divides by sqrt(v): for near-zero gradients it
    # turns that summation-order noise into steps of size ~lr, so it cannot be compared this way.)
    sgd, sgd_micro = train([4], optimizer_class=torch.optim.SGD), train([4], micro=1, optimizer_class=torch.optim.SGD)
    for k in once:
        torch.testing.assert_close(sgd_micro[k], sgd[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(sgd[k], start[k]) for k in once)
    assert any(not torch.equal(once[k], start[k]) for k in once)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, {k: v for k, v in start.items() if "projection" not in k})
    name = next(iter(start))
    with pytest.raises(ValueError, match="has shape"):
        load_trainable_state(model, start | {name: torch.zeros(1)})


def test_encoder_learning_rate_group(runs):
    model, _ = prepare(config(runs))
    optimizer = make_optimizer(model, config(runs, encoder_lr=1e-4))
    new, encoder = optimizer.param_groups
    assert new["lr"] == 1e-2 and encoder["lr"] == 1e-4
    assert sum(p.numel() for g in (new, encoder) for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert len(make_optimizer(model, config(runs)).param_groups[1]["params"]) == len(encoder["params"])


def test_bad_settings_are_named(runs):
    with pytest.raises(ValueError, match="encoder_lr=-1"):
        ContextualizeConfig(encoder="x", encoder_lr=-1)
    with pytest.raises(ValueError, match="task='rating'"):
        ContextualizeConfig(encoder="x", task="rating")
    with pytest.raises(ValueError, match="needs encoder="):
        ContextualizeConfig()
    with pytest.raises(ValueError, match="no encoder or projection"):
        ContextualizeConfig(method="textprompt", strategy="enc", text_history_len=50)
    with pytest.raises(ValueError, match="text_history_len == history_len"):
        ContextualizeConfig(method="textprompt", strategy="lora", text_history_len=10)
    with pytest.raises(ValueError, match="integration='text': the TextPrompt baseline is method='textprompt'"):
        ContextualizeConfig(integration="text", strategy="lora", text_history_len=50)  # the old spelling
    with pytest.raises(ValueError, match="text_history_len=60 exceeds"):
        ContextualizeConfig(encoder="x", text_history_len=60)
    with pytest.raises(ValueError, match=r"unknown contextualize settings \['colour'\]"):
        ContextualizeConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        ContextualizeConfig(encoder="x", max_grad_norm=-1)
    with pytest.raises(ValueError, match="set perceiver=False"):  # the UserLLM settings are checked up front
        ContextualizeConfig(encoder="x", user_tokens="next_item")
    with pytest.raises(FileNotFoundError, match="/nonexistent: no trained model; expected a run directory"):
        prepare(ContextualizeConfig(encoder="/nonexistent", llm=runs["llm"], device="cpu"))
    with pytest.raises(ValueError, match="exceeds the encoder's max_len=11"):
        prepare(config(runs, history_len=20))


def test_resume_accepts_runs_written_before_a_setting_existed(tmp_path):
    config = ContextualizeConfig(encoder="x")
    saved = {k: v for k, v in asdict(config).items() if k != "user_tokens"}  # an older run's config.json
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert RunDir(tmp_path).check_resume(config, resume=True)  # the missing setting takes its default
    with pytest.raises(ValueError, match="'user_tokens': \\('events', 'next_item'\\)"):
        RunDir(tmp_path).check_resume(ContextualizeConfig(encoder="x", user_tokens="next_item", perceiver=False),
                                      resume=True)


@pytest.mark.parametrize("user_tokens", ["events", "next_item"])
def test_catalog_objective_run_lowers_the_catalog_loss(runs, tmp_path, user_tokens):
    settings = config(runs, xattn_layers=[-1], objective="catalog", batch_size=32, steps=20, lr=3e-3,
                      checkpoint_every=20, user_tokens=user_tokens, perceiver=user_tokens == "events",
                      max_grad_norm=1.0 if user_tokens == "events" else 0.0)
    results = contextualize(settings, tmp_path / "run", progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert results["test"]["n"] == 6  # the trained model is an ordinary UserLLM, ranked by beam search
    model, _, loaded = ctx.load_model(tmp_path / "run")
    assert loaded.objective == "catalog" and [len(model.llm.model.layers) - 1] == model.integration.at
    assert model.config.user_tokens == user_tokens
