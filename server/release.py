"""The release boundary: copy out of a run directory exactly what its (epsilon, delta) covers.

`release` writes the final model folder of every phase (final/, userllm/), the public config (config.json
without dp-seed), the privacy ledger, a fresh audit of it and a RELEASE.md that says what each file is and what
covers it. Everything else in a run directory is operator-private (the runner's OPERATOR-PRIVATE.md lists it).
It refuses a run without DP or with a fixed dp-seed (anyone who guesses the seed can remove the noise), a run
that has not finished (its checkpoint still holds the secret seed), a ledger whose audit fails or that lost
charged rounds, and a non-finite model. The release appears atomically: written to a temporary folder beside
``out``, then renamed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from fed_userllm.privacy import USER_LEVEL, audit
from fed_userllm.rundir import (
    AUDIT_JSON,
    AUDIT_TEXT,
    CONFIG,
    LEDGER,
    OPERATOR_PRIVATE,
    RELEASE_README,
    RunDir,
    flower_settings,
)
from fed_userllm.runtime import atomic_write_bytes
from fed_userllm.server.phases import PHASES

SECRET_SETTINGS = (("dp", "seed"),)  # (part, field) of the nested settings
OPERATOR_PRIVATE_TEXT = """\
# Operator-private: do not publish this folder

This run's (epsilon, delta) (privacy_ledger.jsonl, `fed-userllm audit RUN_DIR`) covers the models it released
and nothing else. `fed-userllm release RUN_DIR --out DIR` writes the public part once the run has finished and
its audit passes: the final model folders (final/, userllm/), the public config (config.json without dp-seed),
the privacy ledger and the audit. Everything else here is operator-private:

- metrics.jsonl: exact per-round client training losses, example and step counts, cohort sizes (sampled,
  succeeded, failed), update norms and clipped share, canaries inserted, validation metrics, timings;
- results.json: exact federated evaluation, the clients' hits on their held-out targets summed (Recall@k says
  whether, NDCG@10 where, each held-out item ranked);
- metrics.png, epsilon.png: plots of metrics.jsonl;
- checkpoint.pt: while the run is unfinished, the secret DP seed: whoever holds it can subtract the noise;
- config.json: the settings, with dp-seed (the release drops it; a fixed dp-seed voids the guarantee);
- canaries/: the empirical audit's canary seed and each phase's initial and final tensors (read by
  `fed-userllm audit RUN_DIR --empirical`; they may be deleted after it).

Trust model: under dp='user' the server is trusted: it clips, so it sees each sampled client's update, and the
guarantee covers what leaves the server. Under dp='sample' it is not: clients send only their DP-SGD models and
what the accounting needs, and no federated evaluation runs.
"""


class ReleaseRefused(ValueError):
    """The run directory cannot be released under its privacy guarantee."""


def release(run_dir: str | Path, out: str | Path) -> Path:
    """Write the public part of the finished DP run ``run_dir`` to the new folder ``out``; return ``out``."""
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    if out.exists():
        raise FileExistsError(f"--out {out} already exists: choose a new folder")
    config = RunDir(run_dir).read_config()
    settings = flower_settings(config)
    if settings["dp"]["mode"] == "none":
        raise ReleaseRefused(f"{run_dir} was trained with dp='none': no privacy guarantee covers it, so there is "
                             "nothing to release under one")
    if settings["dp"]["seed"]:
        raise ReleaseRefused(f"{run_dir} was trained with the fixed dp-seed={settings['dp']['seed']}: anyone who "
                             "guesses it can recompute the cohorts and subtract the noise, so its epsilon does not "
                             "hold. Retrain with dp-seed=0 (a secret seed)")
    phases = settings["phases"]
    checkpoint = _finished_checkpoint(run_dir, phases)
    report = audit(run_dir, expected_head_hash=checkpoint.get("ledger_head"))
    if not report.ok:
        raise ReleaseRefused(f"the privacy audit of {run_dir} fails: " + "; ".join(report.problems))
    folders = [PHASES[name].output for name in phases]
    for folder in folders:
        _check_finite(run_dir / folder)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for folder in folders:
            shutil.copytree(run_dir / folder, staging / folder)
        public = {**config, "settings": _public_settings(settings)}
        released = RunDir(staging)
        released.write_config(public)
        shutil.copyfile(run_dir / LEDGER, released.ledger)
        released.write_audit(report.to_json(), report.to_text() + "\n")
        atomic_write_bytes(staging / RELEASE_README, _readme(report, folders).encode())
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _public_settings(settings: dict) -> dict:
    """The nested settings without `SECRET_SETTINGS`."""
    return {part: {k: v for k, v in values.items() if (part, k) not in SECRET_SETTINGS}
            if isinstance(values, dict) else values for part, values in settings.items()}


def _finished_checkpoint(run_dir: Path, phases: list[str]) -> dict:
    """The checkpoint of a finished run: every phase completed and the secret seed deleted."""
    checkpoint = RunDir(run_dir).load_checkpoint(weights_only=False)
    missing = [p for p in phases if p not in checkpoint.get("completed", [])]
    if missing or "dp_seed" in checkpoint:
        raise ReleaseRefused(f"{run_dir} has not finished (phases not completed: {missing or 'none'}; the secret "
                             "seed is still in checkpoint.pt): resume it with resume=true, then release it")
    return checkpoint


def _check_finite(folder: Path) -> None:
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise ReleaseRefused(f"{folder} holds no model (*.safetensors)")
    for path in files:
        for name, tensor in load_file(path).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ReleaseRefused(f"{path}: tensor {name!r} holds NaN or infinite values; it cannot be released")


def _readme(report, folders: list[str]) -> str:  # noqa: ANN001 (an AuditReport)
    h, last = report.header, report.rounds[-1] if report.rounds else None
    spent = (f"RDP epsilon {last.rdp_epsilon:.4g}, PRV epsilon {last.prv_epsilon:.4g}" if last is not None
             else "epsilon 0 (no round was released)")
    unit = "user (client)" if h["mechanism"] == USER_LEVEL else "training window of a client"
    return f"""# Public release of a differentially private federated run

Guarantee: {spent} at delta = {h['delta']:.3g}, for adding or removing one {unit}, composed over every
released round.
Mechanism: {h['mechanism']}, Poisson sampling, noise multiplier {h['noise_multiplier']:g}, clip norm {h['clip_norm']:g},
N = {h['num_clients']} clients. Check it with `fed-userllm audit DIR`.

| file | what it is | covered by |
|---|---|---|
{chr(10).join(f"| {f}/ | the final model of its phase | the guarantee (post-processing of released rounds) |"
              for f in folders)}
| {CONFIG} | the settings (without the secret dp-seed), client count, vocabulary sizes, noise, delta \
| public parameters, chosen before training |
| {LEDGER} | the hash-chained ledger: per round epsilon, phase and sampling rate with a keyed release \
digest (user-level), or each client's DP-SGD rate and steps (sample-level) | the guarantee's parameters \
(sample-level: a client's rate reveals its number of batches) |
| {AUDIT_JSON}, {AUDIT_TEXT} | epsilon recomputed from the ledger (Opacus RDP and PRV) \
| post-processing of the ledger |

Not released (operator-private, see {OPERATOR_PRIVATE} in the run directory): training metrics, exact federated
evaluation, the checkpoint with its seed while the run was unfinished, and the canaries of the empirical audit.
"""
