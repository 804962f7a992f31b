"""An on-device encoder artifact: ``encoder.pte`` plus ``manifest.json``, checked as a pair on every load.

The manifest is everything an app needs besides the ExecuTorch runtime: the input layout, the vocabularies
that turn movie ids and ratings into feature ids, the sequence convention and the .pte's SHA-256. Loading
reads the .pte once, hashes those bytes and hands the same bytes to the runtime, so a corrupt .pte or a
.pte from another export is refused before it runs. This module needs no model code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "fed-userllm/encoder-pte/1"
MANIFEST_NAME = "manifest.json"
PTE_NAME = "encoder.pte"
# key -> fields it must hold; what the on-device path reads
REQUIRED = {
    "format": None,
    "model": ("file", "sha256", "bytes"),
    "features": None,
    "embedding_dim": None,
    "sequence": ("max_len", "min_len", "dynamic", "padding", "pad_id"),
    "vocabularies": None,
    "reserved_ids": ("PAD", "UNK", "MASK"),
    "source": ("model_sha256",),
}


class ArtifactError(ValueError):
    """The artifact folder is missing, corrupt, or its .pte and manifest do not belong together."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Artifact:
    directory: Path
    manifest: dict
    program: bytes  # the verified .pte bytes

    @property
    def model_sha256(self) -> str:
        return self.manifest["model"]["sha256"]


def load_artifact(directory: str | Path) -> Artifact:
    """Read and verify an artifact folder; raise `ArtifactError` naming what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME}; expected a folder written by "
                            "`fed-userllm export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{manifest_path}: format is {found!r}, expected {FORMAT!r}")
    for key, fields in REQUIRED.items():
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: missing key {key!r}")
        missing = [f for f in fields or () if f not in manifest[key]]
        if missing:
            raise ArtifactError(f"{manifest_path}: {key!r} is missing {missing}")
    model = manifest["model"]
    pte_path = directory / model["file"]
    if not pte_path.is_file():
        raise ArtifactError(f"{directory}: the manifest names {model['file']!r}, which does not exist")
    program = pte_path.read_bytes()
    if len(program) != model["bytes"] or sha256_hex(program) != model["sha256"]:
        raise ArtifactError(
            f"{pte_path} does not match {manifest_path} (size {len(program)} vs {model['bytes']} bytes, "
            f"sha256 {sha256_hex(program)[:12]}… vs {model['sha256'][:12]}…): the .pte is corrupt or comes "
            "from another export; export again rather than mixing files")
    return Artifact(directory, manifest, program)
