"""Versioned prompt sets shipped with steerjax (JSON files beside this module)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load_json(name: str) -> dict:
    """Parse steerjax/data/<name>.json."""
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())


def geometry_prompts() -> dict:
    """Neutral prompts and a small formal/informal contrast for the geometry study."""
    return load_json("geometry_prompts")
