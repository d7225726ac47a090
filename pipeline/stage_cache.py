"""Content-addressed stage outputs: a re-run restores every stage whose inputs have not changed.

A stage's key hashes what its output depends on: its input (the parent artifact's hash, or the
model source and example data for export), its settings, and the tool versions. The cache keeps
each stage's files under that key; restoring copies them back and re-checks their hashes, so a
resumed run produces byte-identical artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact, sha256_file
from pipeline.calibration.cache import default_cache_dir
from pipeline.versions import tool_versions

logger = logging.getLogger(__name__)

_FORMAT = 1


def content_key(stage: str, parts: dict[str, Any]) -> str:
    """Hash of a stage name, its inputs and settings (JSON-able), and the tool versions."""
    payload = {"format": _FORMAT, "stage": stage, "tools": tool_versions(), **parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    """Stage artifacts by content key, in ``<cache dir>/stages/<key>/``.

    Args:
        folder: The cache root (default: $ONNXFORGE_CACHE_DIR, else ~/.cache/onnxforge).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._root = (folder or default_cache_dir()) / "stages"

    def restore(self, key: str, workdir: Path) -> Artifact | None:
        """Copy a cached stage output into `workdir`; None when absent or damaged."""
        entry = self._root / key
        record = entry / "artifact.json"
        if not record.is_file():
            return None
        try:
            artifact = Artifact.model_validate_json(record.read_text())
            files = {artifact.path: artifact.sha256, **artifact.external_data}
            for name, digest in files.items():
                if sha256_file(entry / name) != digest:
                    raise ValueError(f"{name} does not match its hash")
            for name in files:
                shutil.copyfile(entry / name, workdir / name)
        except (OSError, ValueError) as e:
            logger.warning("ignoring damaged stage cache entry %s: %s", entry, e)
            return None
        logger.info("restored %s from the stage cache", artifact.path)
        return artifact

    def store(self, key: str, artifact: Artifact, workdir: Path) -> None:
        """Keep a stage's output under `key` (written whole, then renamed into place)."""
        entry = self._root / key
        if entry.exists():
            return
        self._root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=self._root))
        try:
            for name in [artifact.path, *artifact.external_data]:
                shutil.copyfile(workdir / name, temp / name)
            (temp / "artifact.json").write_text(artifact.model_dump_json())
            os.replace(temp, entry)
        except OSError as e:
            logger.warning("could not store %s in the stage cache: %s", artifact.path, e)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
