"""Where fetched and unpacked model files live. Its own module so that the model registry
(specedge/models.py) and the synthetic models (specedge/synthetic.py) both use it without
importing each other."""

from __future__ import annotations

import os
from pathlib import Path


def models_dir() -> Path:
    """$SPECEDGE_MODELS, else ~/.cache/specedge/models."""
    env = os.environ.get("SPECEDGE_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specedge" / "models"
