"""On-device export: the export-friendly encoder, .pte parity, artifact pairs, the device path, bad input."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from fed_userllm.data import load_sequences
from fed_userllm.data.sequences import rating_bucket
from fed_userllm.data.vocab import UNK_ID
from fed_userllm.export.artifact import MANIFEST_NAME, PTE_NAME, ArtifactError, load_artifact
from fed_userllm.export.build import (
    FLOAT_MAX_ABS_DIFF,
    ParityError,
    check_parity,
    export_encoder,
    resolve_run,
)
from fed_userllm.export.device import HistoryError, embed, featurize, read_history
from fed_userllm.export.graph import ExportableEncoder
from fed_userllm.models import ARUserEncoder, ARUserEncoderConfig, BERT4Rec, BERT4RecConfig, load_pretrained
from fed_userllm.serving.schema import UserEmbedding
from fed_userllm.train.centralized import pretrain
from fed_userllm.train.pretrain_config import PretrainConfig

DATA = "synthetic:users=60,items=50,seed=1"
MAX_LEN = 12


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FED_USERLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "pretrain"
    pretrain(PretrainConfig(dataset=DATA, max_len=MAX_LEN, d_model=16, n_layers=1, n_heads=2, epochs=2,
                            batch_size=32, device="cpu"), run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def seq(run):
    return load_sequences(DATA, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def float_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "float"
    export_encoder(run, out)
    return out


@pytest.fixture(scope="module")
def int8_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "int8"
    export_encoder(run, out, quantize="int8")
    return out


def write_csv(path, seq, start, end, header="movieId,rating,timestamp"):
    """Events [start, end) of the dataset as a device would log them (ratings as their star bucket)."""
    ratings = [seq.vocabs["rating"].decode(int(r)) for r in seq.features["rating"][start:end]]
    events = zip(seq.raw_item[start:end], ratings, seq.timestamp[start:end], strict=True)
    rows = [f"{m},{float(r)},{t}" for m, r, t in events]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def eager_embeddings(run, seq, start, end):
    model = load_pretrained(run / "best")
    batch = seq.gather(np.array([start]), np.array([end]), MAX_LEN)
    n = int(batch["mask"].sum())
    with torch.no_grad():
        return model.encode(batch)[0, :n].numpy()


def test_exportable_encoder_equals_eager_with_and_without_padding():
    torch.manual_seed(0)
    model = ARUserEncoder(ARUserEncoderConfig(vocab_sizes={"item": 40, "genre": 7, "rating": 8}, d_model=32,
                                              n_layers=2, n_heads=4, max_len=9, dropout=0.0)).eval()
    n, T = 5, 8
    ids = torch.stack([torch.randint(3, v, (1, T)) for v in (40, 7, 8)], dim=-1)
    mask = torch.arange(T)[None] < n
    batch = {f: ids[..., i].where(mask, 0) for i, f in enumerate(model.config.features)} | {"mask": mask}
    with torch.no_grad():
        ref = model.encode(batch)[0, :n]
        exported = ExportableEncoder(model, max_len=T)
        unpadded = exported(ids[:, :n])[0]
        padded = exported(torch.stack([batch[f] for f in model.config.features], -1))[0, :n]
    assert unpadded.shape == (n, 32)
    torch.testing.assert_close(unpadded, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_len=10"):
        ExportableEncoder(model, max_len=10)


def test_float_export_manifest_and_parity(run, seq, float_dir):
    manifest = load_artifact(float_dir).manifest
    assert manifest == json.loads((float_dir / MANIFEST_NAME).read_text())
    assert manifest["model"]["bytes"] == (float_dir / PTE_NAME).stat().st_size
    assert manifest["delegation"]["partitions"] == 1
    assert "embedding" in " ".join(manifest["delegation"]["undelegated_ops"])
    assert manifest["sequence"] == {**manifest["sequence"], "max_len": MAX_LEN, "min_len": 1, "dynamic": True,
                                    "padding": "right", "pad_id": 0}
    assert manifest["embedding_dim"] == 16 and manifest["weights"] == "float32"
    assert manifest["quantization"] is None
    parity = manifest["parity"]
    assert parity["users"] == seq.num_users and parity["max_abs_diff"] <= FLOAT_MAX_ABS_DIFF
    assert parity["recall@10_pte"] == pytest.approx(parity["recall@10_eager"])
    trained = json.loads((run / "results.json").read_text())["val"]
    assert parity["recall@10_eager"] == pytest.approx(trained["recall@10"])
    vocabs = manifest["vocabularies"]
    assert {f: len(v["values"]) + 3 for f, v in vocabs.items()} == seq.vocab_sizes
    assert manifest["source"]["dataset"] == DATA and manifest["source"]["model_type"] == "ar_encoder"
    assert set(manifest["versions"]) == {"executorch", "torch", "torchao"}


def test_int8_export_is_smaller_and_close(float_dir, int8_dir):
    manifest = load_artifact(int8_dir).manifest
    assert manifest["weights"] == "int8" and set(manifest["quantization"]) == {"linear", "embedding"}
    assert manifest["model"]["bytes"] < load_artifact(float_dir).manifest["model"]["bytes"]
    assert manifest["delegation"]["partitions"] == 1
    assert "embedding_byte.out" in manifest["delegation"]["undelegated_ops"]
    assert manifest["parity"]["min_cosine"] >= 0.99
    assert manifest["parity"]["max_abs_diff"] > 0  # it is really quantized
    assert abs(manifest["parity"]["recall@10_drop"]) <= 0.1


def test_embed_equals_eager_for_full_short_and_long_histories(run, seq, float_dir, tmp_path):
    user = int(np.argmax(seq.lengths()))
    start, val = int(seq.offsets[user]), int(seq.target_index(np.array([user]), "val")[0])
    assert val - start > MAX_LEN  # the file is longer than the on-device window
    result = embed(float_dir, write_csv(tmp_path / "long.csv", seq, start, val), out=tmp_path / "user.json")
    expected = eager_embeddings(run, seq, start, val)  # the last MAX_LEN events, as in evaluation
    assert result["shape"] == [MAX_LEN, 16] and result["events_in_file"] == val - start
    np.testing.assert_allclose(result["embeddings"], expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result["last"], expected[-1], atol=1e-4, rtol=0)
    written = json.loads((tmp_path / "user.json").read_text())  # the serving API's user object
    manifest = load_artifact(float_dir).manifest
    assert set(written) == {"embeddings", "shape", "dtype", "encoder_hash"} and written["dtype"] == "float32"
    assert written["encoder_hash"] == manifest["source"]["model_sha256"] == result["encoder_hash"]
    weights = (run / "best" / "model.safetensors").read_bytes()
    assert written["encoder_hash"] == hashlib.sha256(weights).hexdigest()
    UserEmbedding(**written)  # accepted by the serving API's request schema as is
    assert result["pte_sha256"] == manifest["model"]["sha256"]
    np.testing.assert_allclose(np.array(written["embeddings"]), result["embeddings"], atol=1e-7)

    short = embed(float_dir, write_csv(tmp_path / "short.csv", seq, start, start + 3), tmp_path / "short.npy")
    expected = eager_embeddings(run, seq, start, start + 3)  # fewer events than max_len
    np.testing.assert_allclose(short["embeddings"], expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.load(tmp_path / "short.npy"), short["embeddings"])
    meta = json.loads((tmp_path / "short.npy.json").read_text())
    assert meta["shape"] == [3, 16] and meta["embeddings_file"] == "short.npy"
    assert meta["encoder_hash"] == result["encoder_hash"]
    with pytest.raises(ValueError, match=r"ending in \.json or \.npy"):
        embed(float_dir, tmp_path / "short.csv", out=tmp_path / "short.txt")


def test_fixed_length_export_pads_short_histories(run, seq, tmp_path):
    manifest = export_encoder(run, tmp_path / "fixed", dynamic=False)
    assert manifest["sequence"]["min_len"] == manifest["sequence"]["max_len"] == MAX_LEN
    delegation = manifest["delegation"]
    assert delegation["partitions"] == 1 and "arange.start_out" not in delegation["undelegated_ops"]  # static
    start = int(seq.offsets[1])
    result = embed(tmp_path / "fixed", write_csv(tmp_path / "h.csv", seq, start, start + 2))
    assert result["shape"] == [2, 16]  # padded to MAX_LEN inside, padding rows dropped
    expected = eager_embeddings(run, seq, start, start + 2)
    np.testing.assert_allclose(result["embeddings"], expected, atol=1e-4, rtol=0)


def test_int8_embed_is_close_to_eager(run, seq, int8_dir, tmp_path):
    start = int(seq.offsets[0])
    result = embed(int8_dir, write_csv(tmp_path / "h.csv", seq, start, start + 4))
    expected = eager_embeddings(run, seq, start, start + 4)
    cosine = (result["embeddings"] * expected).sum(1) / np.linalg.norm(result["embeddings"], axis=1) / \
        np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.99


def test_featurize_matches_the_data_layer(seq, float_dir):
    manifest = load_artifact(float_dir).manifest
    stars = np.array([seq.vocabs["rating"].decode(int(r)) for r in seq.features["rating"]], dtype=float)
    ids = featurize(manifest, seq.raw_item, stars)
    np.testing.assert_array_equal(ids, np.stack([seq.features[f] for f in manifest["features"]], axis=1))
    half_stars = np.array([0.5, 1.0, 1.5, 3.5, 4.5, 5.0])
    unknown_movie = np.full(len(half_stars), 10**9)
    ids = featurize(manifest, unknown_movie, half_stars)
    assert (ids[:, :2] == UNK_ID).all()
    np.testing.assert_array_equal(ids[:, 2], seq.vocabs["rating"].encode(rating_bucket(half_stars)))


def test_read_history_orders_by_time_and_reports_bad_rows(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("userId,timestamp,movieId,rating\n7,30,3,4.0\n7,10,1,2.5\n\n7,20,2,5\n7,10,4,1\n")
    movies, ratings = read_history(path)
    np.testing.assert_array_equal(movies, [1, 4, 2, 3])  # stable: the two events at t=10 keep file order
    np.testing.assert_array_equal(ratings, [2.5, 1.0, 5.0, 4.0])
    cases = {
        "movie,rating,timestamp\n1,4,5\n": r"line 1: header .* lacks \['movieId'\]",
        "movieId,rating,timestamp\n1,4,5\nx,4,6\n": r"line 3: field 'movieId' is 'x', expected an integer",
        "movieId,rating,timestamp\n1,nan,5\n": r"line 2: field 'rating' is 'nan', expected a number",
        "movieId,rating,timestamp\n1,7,5\n": r"line 2: field 'rating' is 7.0, expected 0.5..5.0",
        "movieId,rating,timestamp\n1,4\n": r"line 2: 2 fields, expected 3",
        "movieId,rating,timestamp\n1,4,5.5\n": r"line 2: field 'timestamp' is '5.5', expected an integer",
        "movieId,rating,timestamp\n": "no events",
        "": "lacks",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(HistoryError, match=message):
            read_history(path)
    with pytest.raises(HistoryError, match="no such file"):
        read_history(tmp_path / "missing.csv")


def test_corrupt_or_mismatched_pairs_are_refused(float_dir, int8_dir, tmp_path):
    corrupt = shutil.copytree(float_dir, tmp_path / "corrupt")
    data = bytearray((corrupt / PTE_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / PTE_NAME).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt or comes from another export"):
        load_artifact(corrupt)
    mixed = shutil.copytree(float_dir, tmp_path / "mixed")
    shutil.copy(int8_dir / PTE_NAME, mixed / PTE_NAME)
    history = tmp_path / "h.csv"
    history.write_text("movieId,rating,timestamp\n1,4,5\n")
    with pytest.raises(ArtifactError, match="does not match"):
        embed(mixed, history)
    manifest = json.loads((float_dir / MANIFEST_NAME).read_text())
    broken = {"no manifest": (None, "no manifest.json"), "not json": ("{", "not valid JSON"),
              "wrong format": (json.dumps({**manifest, "format": "other/1"}), "format is 'other/1'"),
              "missing key": (json.dumps({k: v for k, v in manifest.items() if k != "vocabularies"}),
                              "missing key 'vocabularies'")}
    for name, (text, message) in broken.items():
        folder = shutil.copytree(float_dir, tmp_path / name.replace(" ", "_"))
        (folder / MANIFEST_NAME).unlink()
        if text is not None:
            (folder / MANIFEST_NAME).write_text(text)
        with pytest.raises(ArtifactError, match=message):
            load_artifact(folder)


def test_parity_thresholds_fail_loudly():
    check_parity({"max_abs_diff": 5e-5, "min_cosine": 0.5}, None)
    check_parity({"max_abs_diff": 0.5, "min_cosine": 0.995}, "int8")
    with pytest.raises(ParityError, match="float .pte differs"):
        check_parity({"max_abs_diff": 2e-4, "min_cosine": 1.0}, None)
    with pytest.raises(ParityError, match="int8 .pte embeddings reach cosine 0.9800"):
        check_parity({"max_abs_diff": 0.1, "min_cosine": 0.98}, "int8")


def test_run_folders_and_refusals(run, tmp_path):
    assert resolve_run(run) == (run / "best", DATA, MAX_LEN)
    federated = tmp_path / "federated"
    shutil.copytree(run / "best", federated / "final")
    (federated / "config.json").write_text(json.dumps({"settings": {"data": {"dataset": DATA, "max_len": MAX_LEN}}}))
    assert resolve_run(federated) == (federated / "final", DATA, MAX_LEN)
    assert resolve_run(federated / "final") == (federated / "final", DATA, MAX_LEN)  # the run's config is read
    bare = tmp_path / "bare"  # a model folder outside any run
    shutil.copytree(run / "best", bare)
    assert resolve_run(bare, dataset=DATA) == (bare, DATA, None)
    with pytest.raises(ValueError, match="pass dataset="):
        resolve_run(bare)
    with pytest.raises(FileNotFoundError, match="no trained model"):
        resolve_run(tmp_path)
    bert = tmp_path / "bert"
    vocab_sizes = load_pretrained(run / "best").config.vocab_sizes
    BERT4Rec(BERT4RecConfig(vocab_sizes=vocab_sizes)).save_pretrained(bert)
    with pytest.raises(ValueError, match="autoregressive"):
        export_encoder(bert, tmp_path / "out", dataset=DATA)
    with pytest.raises(ValueError, match="quantize='int4'"):
        export_encoder(run, tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_embed(run, seq, float_dir, tmp_path, capsys):
    from fed_userllm.cli import main

    start, val = int(seq.offsets[0]), int(seq.target_index(np.array([0]), "val")[0])
    csv = write_csv(tmp_path / "h.csv", seq, start, val)
    assert main(["embed", "--artifact", str(float_dir), "--history", str(csv), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["shape"][1] == 16
    assert '"encoder_hash"' in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("movieId,rating,timestamp\n1,x,5\n")
    assert main(["embed", "--artifact", str(float_dir), "--history", str(tmp_path / "bad.csv")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a").exists()
