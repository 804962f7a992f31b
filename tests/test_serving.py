"""The HTTP contextualization service: a real uvicorn server on loopback, called with httpx."""

import copy
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import httpx
import pytest
import torch
from llm_fixtures import save_tiny_llm, set_gates
from prometheus_client.parser import text_string_to_metric_families

from fed_userllm.data import load_sequences
from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.llm import load_llm
from fed_userllm.models.userllm import UserLLM, UserLLMConfig
from fed_userllm.rundir import USERLLM
from fed_userllm.serving.api import create_app
from fed_userllm.serving.batching import DynamicBatcher, Overloaded
from fed_userllm.serving.config import ServingConfig
from fed_userllm.serving.model import FREE_INSTRUCTION, Job, PrecomputedStates, ServedModel
from fed_userllm.serving.server import BackgroundServer
from fed_userllm.tasks import rank
from fed_userllm.train.contextualize import load_model
from fed_userllm.train.contextualize_config import ContextualizeConfig

KEY = "s3cret-token"
DATASET = "synthetic:users=12,items=20,genres=4,events=10"
MAX_LEN = 8
PROMPTS = ["what should I watch tonight", "recommend a movie", "a film for the weekend", "any comedy", "hi"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A contextualization run laid out as `fed_userllm.train.contextualize` writes it: a pretraining run
    (config.json + best/), a tiny random Llama with a word tokenizer, and config.json + userllm/ of a UserLLM
    whose gates are open (so answers depend on the user)."""
    root = tmp_path_factory.mktemp("serving")
    seq = load_sequences(DATASET, max_len=MAX_LEN)
    torch.manual_seed(0)
    encoder = ARUserEncoder(ARUserEncoderConfig(vocab_sizes=seq.vocab_sizes, d_model=32, n_layers=1,
                                                n_heads=2, max_len=MAX_LEN, dropout=0.0))
    encoder.save_pretrained(root / "pretrain" / "best")
    (root / "pretrain" / "config.json").write_text(json.dumps({"dataset": DATASET, "max_len": MAX_LEN}))
    texts = [seq.catalog.title(i) for i in seq.catalog.titles] + list(seq.vocabs["genre"].tokens) + PROMPTS
    save_tiny_llm(root / "llm", [*texts, FREE_INSTRUCTION], layers=2)
    llm, _ = load_llm(str(root / "llm"), device="cpu")
    config = ContextualizeConfig(encoder=str(root / "pretrain"), llm=str(root / "llm"), task="nextitem",
                                 history_len=MAX_LEN, num_latents=4, eval_users=0, device="cpu")
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(json.dumps(asdict(config)))
    userllm = UserLLMConfig(llm=config.llm, xattn_every=1, xattn_dim=16, n_xattn_heads=2, num_latents=4)
    model = UserLLM(userllm, encoder, llm)
    set_gates(model, 2.0)
    model.save_pretrained(root / "run" / USERLLM)
    return root / "run"


@pytest.fixture(scope="module")
def served(run_dir):
    return ServedModel.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def trained(run_dir):
    """The run as the trainer loads it: the UserLLM with its real encoder, and the task."""
    model, task, _ = load_model(run_dir, device="cpu")
    return model, task


@pytest.fixture(scope="module")
def server(served):
    config = ServingConfig(max_batch_size=8, max_wait_ms=100, max_new_tokens=12, max_body_bytes=64 * 1024)
    with BackgroundServer(create_app(served, config, api_key=KEY)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def history(task, user: int, n: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """User ``user``'s last (at most n) events before their test target, as an encoder batch of one row."""
    span = task.spans([user], "test", n)
    return task.seq.gather(span[:, 0], span[:, 1], n)


def embedding(trained, served, user: int, n: int = MAX_LEN) -> dict:
    """What the phone sends: its encoder's per-event outputs for the history, real events only."""
    model, task = trained
    batch = history(task, user, n)
    states = model.encoder.encode(batch)[0, : int(batch["mask"].sum())].detach()
    return {"embeddings": states.tolist(), "shape": list(states.shape), "dtype": "float32",
            "encoder_hash": served.encoder_hash}


def greedy_text(model: UserLLM, tok, batch: dict, prompt: str, max_new_tokens: int) -> str:
    """UserLLM.generate from a raw history batch, decoded up to EOS."""
    enc = tok([prompt], return_tensors="pt")
    out = model.generate(batch, enc["input_ids"], enc["attention_mask"], do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0].tolist()
    eos = tok.eos_token_id
    return tok.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)


def reference_text(trained, served, user: int, prompt: str, max_new_tokens: int) -> str:
    """The same free request answered by the trainer's UserLLM from the raw history, without the server."""
    model, task = trained
    prompt = served.prompt("free", prompt)
    return greedy_text(model, task.tokenizer, history(task, user), prompt, max_new_tokens)


# ---------------------------------------------------------------- happy paths


def test_free_generation_matches_the_trained_userllm_on_the_raw_history(client, trained, served):
    body = {"user": embedding(trained, served, 0), "task": "free", "prompt": PROMPTS[0], "max_new_tokens": 8}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["items"] is None and 1 <= out["tokens"] <= 8 and out["text"]
    assert out["text"] == reference_text(trained, served, 0, PROMPTS[0], 8)
    t = out["timing"]
    assert t["batch_size"] == 1 and 0 < t["compute_ms"] <= t["total_ms"]
    others = {client.post("/v1/generate", json=body | {"user": embedding(trained, served, u)}).json()["text"]
              for u in range(1, 8)}
    assert others - {out["text"]}  # the answer depends on the user


def test_padding_rows_after_length_are_ignored(client, trained, served):
    body = {"user": embedding(trained, served, 2, n=4), "prompt": PROMPTS[1], "max_new_tokens": 6}
    padded = json.loads(json.dumps(body))
    padded["user"]["embeddings"] += [[123.0] * served.state_dim] * 3
    padded["user"]["shape"] = [7, served.state_dim]
    padded["user"]["length"] = 4
    a, b = client.post("/v1/generate", json=body), client.post("/v1/generate", json=padded)
    assert a.status_code == b.status_code == 200
    assert a.json()["text"] == b.json()["text"]


def test_nextitem_ranks_titles_like_the_task_evaluation(client, trained, served):
    model, task = trained
    r = client.post("/v1/generate", json={"user": embedding(trained, served, 3), "task": "nextitem", "k": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    trie, group = task.titles  # the evaluation's trie: ids are title indices
    title_of = {index: task.seq.catalog.title(raw) for raw, index in group.items()}
    expected = rank(model, task.tokenizer, [task.prompt(*task.spans([3], "test", MAX_LEN)[0])], trie, 5,
                    history(task, 3))[0].tolist()
    assert [item["title"] for item in out["items"]] == [title_of[i] for i in expected]
    for item in out["items"]:
        assert task.seq.catalog.title(item["id"]) == item["title"]  # ids are the dataset's item ids
    assert out["text"] == out["items"][0]["title"]


def test_favgenre_ranks_genre_names(client, trained, served):
    r = client.post("/v1/generate", json={"user": embedding(trained, served, 1), "task": "favgenre", "k": 3})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    genres = trained[1].seq.vocabs["genre"]
    assert len(items) == 3 and len({i["id"] for i in items}) == 3
    assert all(genres.decode(i["id"]) == i["title"] for i in items)


def test_nextitem_unconstrained_generates_free_text(client, trained, served):
    r = client.post("/v1/generate", json={"user": embedding(trained, served, 1), "task": "nextitem",
                                           "constrained": False, "max_new_tokens": 5})
    assert r.status_code == 200 and r.json()["items"] is None and r.json()["tokens"] <= 5


def test_model_info_health_and_openapi(client, server, served):
    info = client.get("/v1/model").json()
    assert info["encoder_hash"] == served.encoder_hash and len(info["encoder_hash"]) == 64
    assert info["integration"] == "xattn" and info["device"] == "cpu" and info["llm_type"] == "llama"
    assert info["embedding"] == {"shape": ["T", 32], "dtype": "float32", "max_events": MAX_LEN}
    assert info["trained_task"] == "nextitem" and info["limits"]["max_new_tokens"] == 12
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}  # no token needed
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/chat/completions", "/v1/models", "/v1/model", "/healthz", "/metrics"} <= set(
        paths)
    assert {"401", "409", "413", "422"} <= set(paths["/v1/generate"]["post"]["responses"])


@pytest.mark.parametrize("integration,user_tokens", [("xattn", "events"), ("softprompt", "events"),
                                                     ("xattn", "next_item")])
def test_precomputed_states_match_the_encoder_path_in_batches(tmp_path, run_dir, trained, integration,
                                                              user_tokens):
    """Without the Perceiver padded events stay visible as masked tokens: batching users of different
    lengths must still give each the answer UserLLM.generate gives from the raw history (with the next-item
    token, the server applies the encoder's item head to the sent states)."""
    model, task = trained
    cfg = UserLLMConfig(llm="unused", integration=integration, perceiver=False, xattn_every=1, xattn_dim=16,
                        n_xattn_heads=2, num_task_prompt_tokens=2, user_tokens=user_tokens)
    base = str(run_dir.parent / "llm")
    reference = UserLLM(cfg, copy.deepcopy(model.encoder), load_llm(base, device="cpu")[0]).eval()
    if integration == "xattn":
        set_gates(reference, 2.0)
    reference.save_pretrained(tmp_path)
    loaded = UserLLM.from_pretrained(tmp_path, llm=load_llm(base, device="cpu")[0],
                                     encoder=PrecomputedStates(32, copy.deepcopy(model.encoder)))
    served = ServedModel(loaded, task.tokenizer, "hash", MAX_LEN, catalogs={})
    jobs, expected = [], []
    for user, n in ((0, 8), (1, 3), (2, 5)):
        batch = history(task, user, n)
        states = reference.encoder.encode(batch)[0, : int(batch["mask"].sum())].detach()
        prompt = served.prompt("free", PROMPTS[user])
        jobs.append(Job(states, prompt, "free", constrained=False, k=0, max_new_tokens=6, temperature=0.0))
        expected.append(greedy_text(reference, task.tokenizer, batch, prompt, 6))
    answers = served.run(jobs)
    assert [a.text for a in answers] == expected and {a.batch_size for a in answers} == {3}
    assert [served.run([job])[0].text for job in jobs] == expected


# ---------------------------------------------------------------- OpenAI-compatible chat completions


@pytest.fixture(scope="module")
def chat_body(trained, served) -> dict:
    return {"user_embedding": embedding(trained, served, 0), "messages": [{"role": "user", "content": PROMPTS[0]}],
            "temperature": 0, "max_tokens": 8}


def sse_events(client: httpx.Client, body: dict) -> list[dict]:
    """The chunks of a streamed chat completion, read line by line as they arrive; checks the SSE framing."""
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_chat_completion_answers_like_generate_in_openai_schema(client, chat_body, served):
    r = client.post("/v1/chat/completions", json=chat_body)
    assert r.status_code == 200, r.text
    out = r.json()
    native = client.post("/v1/generate", json={"user": chat_body["user_embedding"], "prompt": PROMPTS[0],
                                               "max_new_tokens": 8}).json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == served.name == "run" and abs(out["created"] - time.time()) < 600
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": native["text"]}
    assert choice["finish_reason"] == ("length" if native["tokens"] == 8 else "stop")
    prompt_tokens = len(served.tokenizer(served.prompt("free", PROMPTS[0]))["input_ids"])
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": native["tokens"],
                            "total_tokens": prompt_tokens + native["tokens"]}


def test_streamed_chat_equals_the_non_streamed_answer(client, chat_body):
    body = chat_body | {"n": 2, "max_tokens": 12, "stream_options": {"include_usage": True}}
    whole = client.post("/v1/chat/completions", json=body).json()
    events = sse_events(client, body)
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == whole["model"] for e in events)
    assert [c["delta"] for c in events[0]["choices"]] == [{"role": "assistant", "content": ""}] * 2
    for index, expected in enumerate(whole["choices"]):
        mine = [c for e in events[1:] for c in e["choices"] if c["index"] == index]
        pieces = [c["delta"]["content"] for c in mine if "content" in c["delta"]]
        assert "".join(pieces) == expected["message"]["content"]
        assert len(pieces) > 1  # sent while generating, not all at the end
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == expected["finish_reason"]
        assert all("finish_reason" not in c for c in mine[:-1])
    assert whole["choices"][0]["message"] == whole["choices"][1]["message"]  # greedy: n equal choices
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 2 * client.post("/v1/chat/completions", json=chat_body | {
        "max_tokens": 12}).json()["usage"]["completion_tokens"]


def test_chat_ranks_catalog_items_for_a_ranked_task(client, trained, served):
    user = embedding(trained, served, 3)
    native = client.post("/v1/generate", json={"user": user, "task": "nextitem", "k": 5}).json()
    body = {"user_embedding": user, "task": "nextitem", "k": 5}
    out = client.post("/v1/chat/completions", json=body).json()
    [choice] = out["choices"]
    assert choice["message"]["content"] == native["text"] and choice["items"] == native["items"]
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 0
    events = sse_events(client, body)
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == native["text"]
    assert events[-1]["choices"][0]["items"] == native["items"]


def test_models_are_listed_and_named_requests_accepted(client, chat_body, served):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [served.name]
    assert listed["data"][0]["object"] == "model" and listed["data"][0]["owned_by"] == "fed-userllm"
    assert client.post("/v1/chat/completions", json=chat_body | {"model": served.name}).status_code == 200


def set_path(body: dict, path: str, value) -> dict:
    """A deep copy of ``body`` with the field at a dotted ``path`` set to ``value``."""
    body = json.loads(json.dumps(body))
    *parents, name = path.split(".")
    target = body
    for parent in parents:
        target = target[parent]
    target[name] = value
    return body


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "path,value,status,message",
    [
        ("user_embedding.shape", [MAX_LEN, 16], 422, "user_embedding.shape=[8, 16]: expected [T, 32]"),
        ("user_embedding.encoder_hash", "0" * 64, 409, "user_embedding.encoder_hash"),
        ("task", "summarize", 422, "nextitem"),
        ("model", "gpt-4", 404, "model='gpt-4' not found: this server serves 'run'"),
        ("n", 5, 422, "n=5: the limit is 4"),
        ("max_tokens", 13, 422, "max_tokens=13: the limit is 12"),
        ("max_completion_tokens", 13, 422, "max_completion_tokens=13: the limit is 12"),
        ("messages", [], 422, "a non-empty user message is required"),
        ("messages", [{"role": "tool", "content": "x"}], 422, "role"),
        ("temperature", 3, 422, "temperature"),
        ("stop", ["\n"], 422, "stop: Extra inputs are not permitted"),
    ],
)
def test_bad_chat_requests_get_documented_4xx_in_openai_schema(client, chat_body, stream, path, value, status,
                                                               message):
    r = client.post("/v1/chat/completions", json=set_path(chat_body, path, value) | {"stream": stream})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")  # refused before any stream starts
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == status
    assert error["type"] == "invalid_request_error" and "0.1, 0.1" not in r.text


def test_a_stream_that_times_out_ends_with_an_error_event(served, chat_body):
    """Once the status line is sent, an error can only be reported in the stream (OpenAI's error object)."""
    config = ServingConfig(max_new_tokens=12, request_timeout_s=1e-3)
    with BackgroundServer(create_app(served, config)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.post("/v1/chat/completions", json=chat_body).json()["error"]["code"] == 504
        with http.stream("POST", "/v1/chat/completions", json=chat_body | {"stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    first, *_, last = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last == {"error": {"message": "no answer within 0.001 s", "type": "server_error", "param": None,
                              "code": 504}}


def test_ranked_chat_takes_no_messages(client, chat_body):
    r = client.post("/v1/chat/completions", json=chat_body | {"task": "nextitem"})
    assert r.status_code == 422 and "messages: only for task='free'" in r.json()["error"]["message"]


# ---------------------------------------------------------------- safety


def test_load_and_config_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a contextualize or Flower run directory"):
        ServedModel.load(tmp_path)
    with pytest.raises(ValueError, match="max_batch_size=0: expected a positive integer"):
        ServingConfig(max_batch_size=0)


@pytest.mark.parametrize("changes,error", [
    (dict(method="textprompt", strategy="lora", text_history_len=MAX_LEN), "only User-LLM runs can be served"),
    (dict(objective="catalog", xattn_layers=[-1], user_tokens="next_item", perceiver=False, encoder_prior=True),
     r"encoder_prior=True.*cannot be served"),
])
def test_runs_that_take_no_phone_states_are_refused(tmp_path, run_dir, changes, error):
    """A TextPrompt run reads text, and a User-LLM on the encoder's prior needs the encoder's item scores
    (the phone sends states): serving either would answer without the user, so loading says why it cannot."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text()) | changes
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=error):
        ServedModel.load(run, device="cpu")


@pytest.fixture(scope="module")
def valid(trained, served) -> dict:
    return {"user": embedding(trained, served, 0), "prompt": PROMPTS[0], "max_new_tokens": 4}


def changed(body: dict, **changes) -> dict:
    """A deep copy of ``body`` with top-level fields or ``user_<field>`` changed."""
    body = json.loads(json.dumps(body))
    for key, value in changes.items():
        target = body["user"] if key.startswith("user_") else body
        target[key.removeprefix("user_")] = value
    return body


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"])
def test_auth_is_required(server, valid, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("POST", "/v1/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/model"),
                         ("GET", "/v1/models"), ("GET", "/metrics")):
        body = valid if method == "POST" else None
        r = httpx.request(method, server.url + path, headers=headers, json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "changes,status,message",
    [
        ({"user_shape": [MAX_LEN, 16]}, 422, "expected [T, 32]"),
        ({"user_embeddings": [[0.5] * 16] * MAX_LEN, "user_shape": [MAX_LEN, 16]}, 422, "expected [T, 32]"),
        ({"user_shape": [MAX_LEN - 1, 32]}, 422, "as declared in user.shape"),
        ({"user_dtype": "float16"}, 422, "user.dtype='float16'"),
        ({"user_encoder_hash": "0" * 64}, 409, "user.encoder_hash"),
        ({"user_embeddings": [[0.1] * 32] * 9, "user_shape": [9, 32]}, 422, "9 events, at most 8"),
        ({"user_length": 0}, 422, "user.length=0"),
        ({"max_new_tokens": 13}, 422, "max_new_tokens=13: the limit is 12"),
        ({"task": "summarize"}, 422, "nextitem"),
        ({"prompt": None}, 422, "required (non-empty) for task='free'"),
        ({"task": "nextitem"}, 422, "prompt: only for task='free'"),
        ({"constrained": True}, 422, "constrained=true with task='free'"),
        ({"task": "nextitem", "prompt": None, "k": 50}, 422, "k=50"),
        ({"max_tokens": 4}, 422, "extra"),
    ],
)
def test_bad_inputs_get_documented_4xx(client, valid, changes, status, message):
    r = client.post("/v1/generate", json=changed(valid, **changes))
    assert r.status_code == status, r.text
    assert message in r.text
    assert "0.1, 0.1" not in r.text  # the embedding is never echoed back


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_embeddings_are_rejected(client, valid, value):
    body = changed(valid)
    body["user"]["embeddings"][2][5] = "MARK"
    raw = json.dumps(body).replace('"MARK"', value)
    r = client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "1 NaN/inf values (first: event 2, dim 5)" in r.text


def test_body_too_large(client, valid):
    r = client.post("/v1/generate", json=changed(valid, prompt="x" * 70_000))
    assert r.status_code == 413 and "limit is 65536 bytes" in r.text

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"user": '
        for _ in range(100):
            yield b" " * 1000

    r = client.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# ---------------------------------------------------------------- batching


def scrape(client: httpx.Client) -> dict[tuple, float]:
    """GET /metrics, parsed as Prometheus text: {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(r.text) for sample in family.samples}


def metric(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def errors(values: dict) -> float:
    return sum(v for (name, labels), v in values.items()
               if name == "fed_userllm_requests_total" and dict(labels)["status"] != "200")


def test_concurrent_requests_are_batched_and_answered_like_unbatched(client, trained, served):
    bodies = [{"user": embedding(trained, served, i, n=3 + i % 5), "prompt": PROMPTS[i % len(PROMPTS)],
               "max_new_tokens": 10} for i in range(8)]
    alone = [client.post("/v1/generate", json=b).json() for b in bodies]
    assert all(a["timing"]["batch_size"] == 1 for a in alone)
    assert len({a["text"] for a in alone}) > 1
    before = scrape(client)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: client.post("/v1/generate", json=b), bodies))
    assert all(r.status_code == 200 for r in together)
    assert [r.json()["text"] for r in together] == [a["text"] for a in alone]
    assert max(r.json()["timing"]["batch_size"] for r in together) > 1
    after = scrape(client)

    def grew(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("fed_userllm_requests_total", endpoint="/v1/generate", status="200") == 8
    assert grew("fed_userllm_request_duration_seconds_count", endpoint="/v1/generate") == 8
    assert grew("fed_userllm_request_duration_seconds_sum", endpoint="/v1/generate") > 0
    assert grew("fed_userllm_batch_size_sum") == 8 and grew("fed_userllm_batch_size_count") < 8  # a batch > 1
    assert grew("fed_userllm_batch_size_bucket", le="1.0") < grew("fed_userllm_batch_size_count")
    assert grew("fed_userllm_generated_tokens_total") == sum(r.json()["tokens"] for r in together)
    assert errors(after) == errors(before)


def test_metrics_count_errors_by_status(client, valid, chat_body):
    before = scrape(client)
    client.post("/v1/generate", json=changed(valid, user_dtype="int8"))
    client.post("/v1/chat/completions", json=chat_body | {"model": "gpt-4"})
    client.post("/v1/generate", content=b"{" + b" " * 70_000, headers={"Content-Type": "application/json"})
    after = scrape(client)
    for endpoint, status in (("/v1/generate", "422"), ("/v1/chat/completions", "404"), ("/v1/generate", "413")):
        key = ("fed_userllm_requests_total", tuple(sorted({"endpoint": endpoint, "status": status}.items())))
        assert after[key] == before.get(key, 0.0) + 1, (endpoint, status)


def test_batcher_isolates_a_failing_request():
    sizes = []

    def run(items):
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [2 * i for i in items]

    batcher = DynamicBatcher(run, max_batch_size=8, max_wait_s=0.2, on_batch=lambda n, s: sizes.append(n))
    futures = [batcher.submit(i) for i in (1, 2, -3, 4)]
    assert [f.result(timeout=10) for f in futures[:2] + futures[3:]] == [2, 4, 8]
    with pytest.raises(ValueError, match=r"negative item in \[-3\]"):
        futures[2].result(timeout=10)
    assert sizes == [1, 1, 1]  # the batch of 4 failed, then each ran alone
    keyed = [batcher.submit(i, key=i % 2) for i in range(6)]
    assert [f.result(timeout=10) for f in keyed] == [0, 2, 4, 6, 8, 10]
    assert sorted(sizes[3:]) == [3, 3]  # one call per key
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_batcher_rejects_when_the_queue_is_full():
    release = threading.Event()

    def blocked(items):
        release.wait()
        return items

    batcher = DynamicBatcher(blocked, max_batch_size=1, max_queue=2)
    first = batcher.submit(0)
    deadline = time.monotonic() + 5
    while not first.running():  # the worker holds the first item; the queue is empty again
        assert time.monotonic() < deadline
        time.sleep(0.01)
    batcher.submit(1), batcher.submit(2)
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit(3)
    release.set()
    assert first.result(timeout=5) == 0
    batcher.close()


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_history_csv_to_pte_embedding_to_http_answer(tmp_path, client, trained, served, run_dir):
    """A user's events CSV -> the exported encoder (.pte, ExecuTorch runtime) -> HTTP -> generated text,
    the same text the trainer's UserLLM writes from the raw history."""
    from fed_userllm.export.build import export_encoder  # executorch is heavy: imported by this test only
    from fed_userllm.export.device import embed

    manifest = export_encoder(run_dir / USERLLM / "encoder", tmp_path / "artifact",
                              max_len=MAX_LEN, parity_users=4, dynamic=False)  # static shapes lower 3x faster
    assert manifest["source"]["model_sha256"] == served.encoder_hash  # what the phone sends as encoder_hash
    model, task = trained
    seq, user = task.seq, 4
    start, end = task.spans([user], "test", MAX_LEN)[0]
    lines = ["movieId,rating,timestamp"] + [
        f"{seq.raw_item[i]},{seq.vocabs['rating'].decode(int(seq.features['rating'][i]))},{seq.timestamp[i]}"
        for i in range(start, end)]
    (tmp_path / "history.csv").write_text("\n".join(lines) + "\n")
    result = embed(tmp_path / "artifact", tmp_path / "history.csv", out=tmp_path / "user.json")
    assert result["encoder_hash"] == served.encoder_hash
    eager = model.encoder.encode(history(task, user))[0, : end - start].detach()
    assert result["shape"] == [end - start, served.state_dim] and result["dtype"] == "float32"
    assert torch.allclose(torch.from_numpy(result["embeddings"]), eager, atol=1e-4)

    user_object = json.loads((tmp_path / "user.json").read_text())  # `embed` writes the request's user object
    r = client.post("/v1/generate", json={"user": user_object, "prompt": PROMPTS[2], "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == reference_text(trained, served, user, PROMPTS[2], 8)
