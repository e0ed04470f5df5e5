"""The feature cache of frozen backbones: a backbone's output computed once per example and reused by
every epoch, and by later jobs on the same model and data.

Entries are keyed by what determines the features: the backbone's weights (a package version or a
weights digest, plus a checkpoint's digest), the input preprocessing, the dataset's content digest and
how it was read, and the precision it was computed in. Files are safetensors, written atomically, so
concurrent jobs can share the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


class FeatureCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / "features" / f"{key}.safetensors"

    def get_or_compute(self, key: str, compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """The cached features for `key`, computing and storing them on a miss; True when it was a hit."""
        path = self.path(key)
        if path.exists():
            try:
                return load_file(str(path))["features"], True
            except Exception:
                path.unlink(missing_ok=True)  # a damaged entry is recomputed
        features = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{uuid.uuid4().hex}.part")
        try:
            save_file({"features": features.detach().to("cpu").contiguous()}, str(temp))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return features, False
