"""Run directories: the one owner of their file and folder names, their atomic writes, the resume check, and
the loaders that find a trained model in any of them.

Three kinds of run write a run directory, told apart by their config.json:

    pretrain        `fed-userllm pretrain`: config.json is a PretrainConfig; the model is best/
    contextualize   `fed-userllm contextualize`: config.json is a ContextualizeConfig; the model is userllm/
    flower          the Flower app: config.json holds {"settings": ...} (`flower_settings`); models popularity/,
                    final/, userllm/

Every kind has config.json, metrics.jsonl (one JSON line per epoch, logging step or round), checkpoint.pt
(the latest resumable state, replaced atomically) and results.json (final metrics). A User-LLM model folder
(userllm/) is the same for both kinds that write one: `fed_userllm.models.userllm.UserLLM.save_pretrained`
(config, trained tensors, the encoder, LoRA as a PEFT adapter); a contextualize run of the TextPrompt baseline
holds `fed_userllm.models.textprompt.TextPromptLLM.save_pretrained` there instead. A new run points ``latest``
beside it (e.g. runs/latest) at itself, so ``fed-userllm serve --model runs/latest`` serves the newest run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from fed_userllm.runtime import append_jsonl, atomic_torch_save, atomic_write_bytes, atomic_write_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
LEDGER = "privacy_ledger.jsonl"
PRIVACY_REPORT = "privacy_report.txt"
AUDIT_JSON, AUDIT_TEXT = "privacy_audit.json", "privacy_audit.txt"
OPERATOR_PRIVATE = "OPERATOR-PRIVATE.md"  # lists the files the DP guarantee does not cover
RELEASE_README = "RELEASE.md"  # `fed-userllm release`: what each released file is and what covers it
CANARIES = "canaries"
PLOTS = ("metrics.png", "epsilon.png")
# model folders
BEST = "best"  # pretrain: the best encoder by validation NDCG@10
POPULARITY = "popularity"  # flower: the released item popularity
FINAL = "final"  # flower: the federated encoder
USERLLM = "userllm"  # flower and contextualize: the User-LLM model folder
OLD_USERLLM = "model"  # contextualize runs written before userllm/ was their model folder
ENCODER_FOLDERS = (f"{USERLLM}/encoder", BEST, FINAL)  # the encoder a run deploys: the one its User-LLM reads
LATEST = "latest"

PRETRAIN, CONTEXTUALIZE, FLOWER = "pretrain", "contextualize", "flower"


class RunDir:
    """One run directory: where its files are, how they are written, and whether a run may (re)start in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.config = self.path / CONFIG
        self.metrics = self.path / METRICS
        self.checkpoint = self.path / CHECKPOINT
        self.results = self.path / RESULTS
        self.ledger = self.path / LEDGER
        self.privacy_report = self.path / PRIVACY_REPORT

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        """Whether a run was started here (its config.json is written first)."""
        return self.config.is_file()

    def read_config(self) -> dict:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no {CONFIG})")
        return json.loads(self.config.read_text())

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config, config)

    @property
    def kind(self) -> str:
        """pretrain, contextualize or flower, from the run's config.json."""
        config = self.read_config()
        if "settings" in config:
            return FLOWER
        if "integration" in config:
            return CONTEXTUALIZE
        if "dataset" in config:
            return PRETRAIN
        raise ValueError(f"{self.config}: not the config of a pretrain, contextualize or Flower run")

    def check_resume(self, settings, resume: bool, *, read_saved: Callable[[dict], dict] | None = None,
                     resume_flag: str = "--resume", out_flag: str = "--out", require_run: bool = False) -> bool:
        """Whether this continues a run. A run already here is continued only with ``resume`` and the same
        ``settings``: a settings dataclass (the saved config.json is read through its ``from_dict``, so
        settings added since the run was written take their defaults), or a dict compared with what
        ``read_saved`` reads of config.json. ``require_run``: resuming nothing is an error too."""
        if not self.exists():
            if resume and require_run:
                raise FileNotFoundError(f"{resume_flag} but {out_flag}={str(self.path)!r} holds no run "
                                        f"(no {CONFIG})")
            return False
        if not resume:
            raise FileExistsError(f"{out_flag}={str(self.path)!r} already holds a run: set {resume_flag} to "
                                  f"continue it, or choose another {out_flag}")
        saved = self.read_config()
        if read_saved is not None:
            saved = read_saved(saved)
        if is_dataclass(settings):
            settings, saved = asdict(settings), asdict(type(settings).from_dict(saved))
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"{self.config} was written with other settings {changed} (old, new): a resumed "
                             "run must use the same settings")
        return True

    def mark_latest(self) -> None:
        """Point ``latest`` beside this run at it (replaced atomically: readers see the old or the new run)."""
        link = self.path.parent / LATEST
        if self.path.name == LATEST or (link.exists() and not link.is_symlink()):
            return
        tmp = link.with_name(f".{LATEST}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(self.path.name, tmp)
        os.replace(tmp, link)

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics, record)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Drop the metric lines ``keep`` rejects (written after the checkpoint a run resumes from)."""
        records = self.read_metrics()
        kept = [r for r in records if keep(r)]
        if len(kept) != len(records):
            atomic_write_bytes(self.metrics, "".join(json.dumps(r, default=float) + "\n" for r in kept).encode())

    def read_results(self) -> dict:
        return json.loads(self.results.read_text()) if self.results.exists() else {}

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results, results)

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(state, self.checkpoint)

    def load_checkpoint(self, weights_only: bool = True, map_location=None) -> dict:
        """The checkpoint's state, {} when there is none yet."""
        import torch

        if not self.checkpoint.exists():
            return {}
        return torch.load(self.checkpoint, map_location=map_location, weights_only=weights_only)

    def write_audit(self, as_json: str, as_text: str) -> None:
        atomic_write_bytes(self.path / AUDIT_JSON, as_json.encode())
        atomic_write_bytes(self.path / AUDIT_TEXT, as_text.encode())


# ---------------------------------------------------------------------------------------------- finding models


@dataclass(frozen=True)
class EncoderSource:
    """A saved encoder (or popularity model) and, when its run says so, its dataset and window length."""

    folder: Path
    dataset: str | None
    max_len: int | None


def is_model_folder(path: Path) -> bool:
    """A `save_pretrained` folder of an encoder or of the popularity model."""
    from fed_userllm.models.layers import CONFIG_FILE, WEIGHTS_FILE

    config = path / CONFIG_FILE
    return config.is_file() and (path / WEIGHTS_FILE).is_file() and "model_type" in json.loads(config.read_text())


def find_run(path: str | Path, depth: int = 2) -> RunDir | None:
    """The run directory ``path`` is, or holds ``path`` as a model folder (up to ``depth`` levels up)."""
    path = Path(path).expanduser().resolve()
    for candidate in [path, *path.parents][:depth + 1]:
        run = RunDir(candidate)
        if run.exists() and not is_model_folder(candidate):
            return run
    return None


def find_encoder(path: str | Path) -> EncoderSource:
    """The encoder of a run of any kind, or of a model folder (userllm/encoder too); the dataset and window
    length come from the run's own config.json (None for a model folder outside a run)."""
    path = Path(path).expanduser()
    run = find_run(path)
    if run is not None and run.path == path.resolve():
        if run.kind == CONTEXTUALIZE:
            saved = _userllm_folder(run) / "encoder"
            if is_model_folder(saved):
                return EncoderSource(saved, *_dataset_of(run))
            return find_encoder(run.read_config()["encoder"])
        folder = next((run / f for f in ENCODER_FOLDERS if is_model_folder(run / f)), None)
        if folder is None:
            raise FileNotFoundError(f"{path}: no trained model (expected {' or '.join(ENCODER_FOLDERS)}/ with "
                                    f"{CONFIG} + model.safetensors)")
        return EncoderSource(folder, *_dataset_of(run))
    if not is_model_folder(path):
        raise FileNotFoundError(f"{path}: no trained model; expected a run directory (pretrain: best/, Flower: "
                                f"final/, contextualize: {USERLLM}/encoder) or a model folder ({CONFIG} with "
                                "model_type + model.safetensors)")
    return EncoderSource(path, *(_dataset_of(run) if run is not None else (None, None)))


def _dataset_of(run: RunDir) -> tuple[str | None, int | None]:
    """(dataset, window length) a run trained on."""
    config = run.read_config()
    kind = run.kind
    if kind == FLOWER:
        data = flower_settings(config)["data"]
        return data["dataset"], data["max_len"]
    if kind == PRETRAIN:
        return config["dataset"], config["max_len"]
    encoder = find_encoder(config["encoder"]) if config.get("encoder") else None
    return config.get("dataset") or (encoder.dataset if encoder else None), encoder.max_len if encoder else None


@dataclass(frozen=True)
class UserLLMSource:
    """A User-LLM model folder and the contextualization settings of the run that wrote it."""

    folder: Path
    run: RunDir
    config: dict  # a ContextualizeConfig as a dict (the settings of a Flower run translated)


def _userllm_folder(run: RunDir) -> Path:
    old = run / OLD_USERLLM
    return old if old.is_dir() and not (run / USERLLM).is_dir() else run / USERLLM


def find_userllm(path: str | Path) -> UserLLMSource:
    """The User-LLM of a contextualize or Flower run directory, or of its model folder."""
    path = Path(path).expanduser()
    run = find_run(path, depth=1)
    if run is None or run.kind == PRETRAIN:
        raise FileNotFoundError(f"{path}: expected a contextualize or Flower run directory (with {USERLLM}/) or "
                                "its model folder")
    folder = path if run.path != path.resolve() else _userllm_folder(run)
    if not folder.is_dir():
        raise FileNotFoundError(f"{run.path}: no trained User-LLM (expected {folder}/; has the run finished?)")
    config = run.read_config()
    if run.kind == FLOWER:
        config = flower_contextualize_settings(run)
    return UserLLMSource(folder, run, config)


def flower_contextualize_settings(run: RunDir) -> dict:
    """A Flower run's contextualize phase as `fed_userllm.train.contextualize_config.ContextualizeConfig`
    fields (the run itself is the encoder source: its userllm/encoder, else final/)."""
    from fed_userllm.train.contextualize_config import ContextualizeConfig

    settings = flower_settings(run.read_config())
    data, llm = settings["data"], settings["llm"]
    return asdict(ContextualizeConfig(
        encoder=str(run.path), dataset=data["dataset"], llm=llm["model"], task=llm["task"],
        integration=llm["integration"], history_len=data["max_len"], user_tokens=llm["user_tokens"],
        perceiver=llm["user_tokens"] == "events", objective=llm["objective"],
        xattn_layers=[-1] if llm["objective"] == "catalog" else None))


def flower_settings(config: dict) -> dict:
    """The nested settings of a Flower run's config.json (`fed_userllm.train.federated_config`); a run saved
    before the settings were nested is read too."""
    from fed_userllm.train.federated_config import saved_settings

    return saved_settings(config["settings"])


def list_runs(root: str | Path) -> list[tuple[RunDir, str]]:
    """The runs directly under ``root`` with their kind, newest first (folders of other configs skipped)."""
    root = Path(root)
    runs = [RunDir(p) for p in root.iterdir() if p.is_dir() and not p.is_symlink()] if root.is_dir() else []
    listed = []
    for run in sorted((r for r in runs if r.exists()), key=lambda r: r.config.stat().st_mtime, reverse=True):
        try:
            listed.append((run, run.kind))
        except ValueError:
            continue
    return listed
