"""Versioned data shipped with steerjax (JSON files beside this module): prompt sets and probe lexicons."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

from steerjax.errors import InputError


@lru_cache(maxsize=None)
def load_json(name: str) -> dict:
    """Parse steerjax/data/<name>.json."""
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())


def geometry_prompts() -> dict:
    """Neutral prompts and a small formal/informal contrast for the geometry study."""
    return load_json("geometry_prompts")


# The shipped traits, in traits.json's order (the one list every module and script uses).
TRAITS: tuple[str, ...] = tuple(load_json("traits")["traits"])
ENVIRONMENTS = ("in_distribution", "topic_shift", "genre_shift", "safety_style")


def check_trait(trait) -> str:
    """`trait` stripped and lower-cased if it is one of TRAITS, else InputError naming the valid traits."""
    if not isinstance(trait, str) or trait.strip().lower() not in TRAITS:
        raise InputError(f"unknown trait {trait!r}; valid traits are {', '.join(TRAITS)}")
    return trait.strip().lower()


def trait_info(trait: str) -> dict:
    """Metadata and pairs of one trait from traits.json: description, positive_label, negative_label and
    pairs (50 dicts with positive, negative, context). Unknown trait -> InputError. Returns a copy."""
    return copy.deepcopy(load_json("traits")["traits"][check_trait(trait)])


def trait_pairs(trait: str) -> tuple[list[str], list[str]]:
    """(positive prompts, negative prompts) of one trait's 50 contrastive pairs, index-aligned, for
    mean-difference extraction: v = mean h(positive) - mean h(negative). Unknown trait -> InputError."""
    pairs = load_json("traits")["traits"][check_trait(trait)]["pairs"]
    return [p["positive"] for p in pairs], [p["negative"] for p in pairs]


def neutral_eval_prompts() -> list[str]:
    """The 100 held-out, trait-free evaluation prompts (open-ended openings)."""
    return list(load_json("neutral_eval")["prompts"])


def neutral_pool() -> list[str]:
    """The 240 trait-free prompts (openings and questions) of the identifiability study's pool, from which
    disjoint train / held-out splits are drawn. Disjoint from every other shipped prompt set."""
    return list(load_json("neutral_pool")["prompts"])


def environments() -> dict[str, list[str]]:
    """Prompts of the four distribution-shift environments (ENVIRONMENTS order), 25 each."""
    envs = load_json("environments")["environments"]
    return {name: list(envs[name]["prompts"]) for name in ENVIRONMENTS}


def probe_lexicons() -> dict:
    """The LexicalProbe's versioned lexicons from probes.json (a copy): version, description, command_verbs
    (words that open a bare imperative sentence) and traits: trait -> {"positive": {"phrases", "regex"},
    "negative": {"phrases", "regex"}, "weights": {"bias", feature: weight, ...}}, one entry per TRAITS."""
    return copy.deepcopy(load_json("probes"))
