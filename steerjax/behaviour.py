"""Behavioural steering studies (the paper's Section 6): sampled generations under steering conditions,
probe scores, and the comparisons the paper reports (Cohen's d, correlation, perp-only efficacy), with the
corrected protocol's additions (unsteered baseline, paired sampling, TOST, power; the pure statistics live in
`steerjax.stats`).

A *condition* is one steering setting (layer, vector, alpha) applied to every row of a `GenerationPlan`
(prompts x samples, prompt-major). `run_conditions` generates and scores the conditions a `UnitStore`
does not hold yet, saving after each one, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from typing import Mapping, Sequence

import numpy as np

from steerjax import clustered, data, stats
from steerjax.checks import check_positive_int, check_positive_number
from steerjax.errors import InputError
from steerjax.extraction import extract_vector
from steerjax.generation import GenerationOutput, generate, generated_texts, generated_token_ids
from steerjax.io import UnitStore
from steerjax.probes import make_probe
from steerjax.sequence import continuation_logprobs
from steerjax.steering import Steer
from steerjax.studies import StudyProtocol

# Instructions that frame an environment prompt in the trait-positive / trait-negative register, used to
# extract a steering vector *in* an environment (v_env = mean_i h(pos + prompt_i) - h(neg + prompt_i)).
TRAIT_FRAMINGS: dict[str, tuple[str, str]] = {
    "formality": ("Respond in a formal, professional register.", "Respond in a casual, colloquial register."),
    "politeness": ("Respond politely and courteously.", "Respond rudely and dismissively."),
    "humor": ("Respond in a humorous, joking way.", "Respond in a serious, matter-of-fact way."),
}


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """Rows = each prompt repeated `samples_per_prompt` times (prompt-major); sampling settings."""

    prompts: tuple[str, ...]
    samples_per_prompt: int = 5
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_p: float = 1.0

    def __post_init__(self):
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise InputError("a generation plan needs at least one non-empty prompt")
        check_positive_int(self.samples_per_prompt, "samples_per_prompt")
        check_positive_int(self.max_new_tokens, "max_new_tokens")
        check_positive_number(self.temperature, "temperature (behavioural studies sample)")

    @property
    def row_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.samples_per_prompt)]

    @property
    def n_rows(self) -> int:
        return len(self.prompts) * self.samples_per_prompt


def trait_vectors(lm, traits: Sequence[str], layer: int) -> dict[str, np.ndarray]:
    """trait -> mean-difference steering vector (d,) float64 of the trait's shipped contrastive pairs."""
    out = {}
    for trait in traits:
        pos, neg = data.trait_pairs(trait)
        out[trait] = np.asarray(extract_vector(lm, pos, neg, layer, method="mean_diff"), np.float64)
    return out


def framed_pairs(trait: str, prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(positive, negative) texts: each prompt after the trait's positive / negative instruction."""
    if trait not in TRAIT_FRAMINGS:
        raise InputError(f"no framing for trait {trait!r}; known: {', '.join(TRAIT_FRAMINGS)}")
    pos, neg = TRAIT_FRAMINGS[trait]
    return [f"{pos}\n\n{p}" for p in prompts], [f"{neg}\n\n{p}" for p in prompts]


def condition_seed(protocol: StudyProtocol, base_seed: int, key: str) -> int:
    """Sampling seed of a condition: the base seed for every condition under paired sampling (common
    random numbers: row r draws the same uniforms in every condition), else a seed derived from the
    condition's key (independent noise per condition, as the paper's unseeded runs)."""
    if protocol.paired_sampling:
        return int(base_seed)
    return int(zlib.crc32(f"{int(base_seed)}/{key}".encode()) & 0x7FFFFFFF)


def generate_condition(lm, plan: GenerationPlan, batch, layer: int | None, vector, alpha: float,
                       positions: str, seed: int) -> tuple[list[str], GenerationOutput]:
    """Generated continuations (generated text only, cut at EOS), one per plan row, and the raw output.
    layer None: unsteered."""
    steer = None if layer is None else Steer(int(layer), np.asarray(vector, np.float64), float(alpha), positions)
    out = generate(lm, batch, steer, max_new_tokens=plan.max_new_tokens, temperature=plan.temperature,
                   top_p=plan.top_p, seed=seed)
    return generated_texts(lm, out), out


def repetition_rate(token_ids: Sequence[int], n: int = 3) -> float | None:
    """1 - distinct n-grams / n-grams of one continuation's token ids: 0 when no n-gram repeats, -> 1 for a loop;
    None when it has fewer than n tokens. A degeneration measure to read next to the trait scores."""
    check_positive_int(n, "n")
    ids = [int(t) for t in token_ids]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return None if not grams else 1.0 - len(set(grams)) / len(grams)


def fluency(lm, out: GenerationOutput, n: int = 3) -> dict[str, list]:
    """Per row of a generation: the repetition rate of its continuation (`repetition_rate`, tokens up to EOS) and
    the unsteered model's mean per-token log-likelihood of it (nats), so a trait change can be told from
    degeneration."""
    logp = continuation_logprobs(lm, out.tokens, out.attention_mask, out.prompt_len)
    repetition = [repetition_rate(ids, n) for ids in generated_token_ids(lm, out)]
    loglik = [None if np.all(np.isnan(r)) else float(np.nanmean(r)) for r in logp]
    return {"repetition": repetition, "unsteered_loglik": loglik}


def score_rows(probe, row_prompts: Sequence[str], texts: Sequence[str]) -> dict[str, list[float]]:
    """Probe scores of the generated text alone and of prompt + generated text (the paper's choice)."""
    return {"generated": probe.score(list(texts)).tolist(),
            "with_prompt": probe.score([p + t for p, t in zip(row_prompts, texts)]).tolist()}


@dataclasses.dataclass(frozen=True)
class StudyProbes:
    """The probes a study scores with. Every condition is scored by every `primary` probe (trait -> Probe) on the
    generated text and on prompt + generated text; the `second` kind's probes (trait -> Probe, e.g. the model's
    own log-prob probe next to the lexical one) score the generated text of the traits a condition steers (its
    key's first "/" field, or the environment's second) and every trait for a condition that names no trait
    (base)."""

    primary: Mapping
    second: Mapping = dataclasses.field(default_factory=dict)
    second_kind: str | None = None
    second_skips: tuple[str, ...] = ()

    def second_traits(self, key: str) -> list[str]:
        """The traits the second probe scores in condition `key` (none when the key's last field, seed digits
        removed, is one of `second_skips`, e.g. "perp" for the perp-only controls)."""
        if key.rsplit("/", 1)[-1].rstrip("0123456789") in self.second_skips:
            return []
        named = [t for t in key.split("/") if t in self.second]
        return named[:1] if named else list(self.second)


def study_probes(kind: str, traits: Sequence[str], lm, second: bool = True, skips: Sequence[str] = ()) -> StudyProbes:
    """The primary `kind` ("lexical" or "model") for `traits`, and the other of the two as the second probe
    (not run on conditions whose last key field is in `skips`)."""
    other = "model" if kind == "lexical" else "lexical"
    return StudyProbes(make_probes(kind, traits, lm), make_probes(other, traits, lm) if second else {},
                       other if second else None, tuple(skips))


def run_conditions(lm, plan: GenerationPlan, conditions: Mapping[str, tuple], store: UnitStore, probes,
                   protocol: StudyProtocol, base_seed: int, desc: str = "conditions") -> None:
    """Generate and score every condition not yet in `store`, saving after each.

    conditions: key -> (layer or None, vector (d,) or None, alpha); probes: a StudyProbes, or trait -> Probe
    (primary only). Each stored unit: texts, scores {trait: {"generated", "with_prompt"}}, second_scores
    {kind: {trait: generated-text scores}} (`StudyProbes.second_traits`), fluency {"repetition",
    "unsteered_loglik"} (`fluency`), seed, seconds."""
    from tqdm import tqdm

    probes = probes if isinstance(probes, StudyProbes) else StudyProbes(probes)
    todo = [k for k in conditions if k not in store]
    if not todo:
        return
    batch = lm.tokenize(plan.row_prompts)
    rows = plan.row_prompts
    bar = tqdm(total=len(conditions), initial=len(conditions) - len(todo), desc=desc, unit="cond", file=sys.stderr)
    for key in todo:
        layer, vector, alpha = conditions[key]
        seed = condition_seed(protocol, base_seed, key)
        t0 = time.time()
        texts, out = generate_condition(lm, plan, batch, layer, vector, alpha, protocol.positions, seed)
        unit = {"texts": texts, "scores": {trait: score_rows(probe, rows, texts)
                                           for trait, probe in probes.primary.items()}}
        if probes.second and probes.second_traits(key):
            unit["second_scores"] = {probes.second_kind: {t: probes.second[t].score(list(texts)).tolist()
                                                          for t in probes.second_traits(key)}}
        unit.update(fluency=fluency(lm, out), seed=seed, seconds=time.time() - t0)
        store.put(key, unit)
        bar.update(1)
    bar.close()


def scores_of(unit: Mapping, protocol: StudyProtocol, trait: str, kind: str | None = None) -> np.ndarray:
    """The protocol's `trait` scores of a stored unit (prompt + generated text for the paper protocol); with
    `kind`, the second probe's scores of the generated text."""
    if kind is not None:
        return np.asarray(unit["second_scores"][kind][trait], np.float64)
    return np.asarray(unit["scores"][trait]["with_prompt" if protocol.score_prompt else "generated"], np.float64)


def has_second_scores(unit: Mapping, kind: str | None, trait: str) -> bool:
    """Whether a stored unit holds the second probe `kind`'s scores of `trait`."""
    return kind is not None and trait in unit.get("second_scores", {}).get(kind, {})


def fluency_summary(unit: Mapping, clusters) -> dict:
    """Prompt-level means of a condition's fluency measures, each with a cluster-bootstrap 95% interval:
    repetition rate (distinct 3-grams) and the unsteered model's per-token log-likelihood (nats). Rows with no
    value (too short) are left out of their prompt's mean."""
    out = {}
    for name in ("repetition", "unsteered_loglik"):
        values = np.array([np.nan if x is None else x for x in unit["fluency"][name]], np.float64)
        keep = np.isfinite(values)
        means = clustered.cluster_means(values[keep], np.asarray(clusters)[keep]) if keep.any() else values[:0]
        if means.size < 2:
            out[name] = None
            continue
        ci = clustered.cluster_bootstrap_ci(means, np.arange(means.size))
        out[name] = {"mean": float(means.mean()), "ci_low": ci.low, "ci_high": ci.high}
    return out


# ----------------------------------------------------------------------------- comparisons

def effect_size(protocol: StudyProtocol, a, b) -> float | None:
    """The protocol's Cohen's d of a vs b (paper: unsigned ddof-0; corrected: signed pooled); None if
    both samples are constant."""
    fn = stats.paper_cohens_d if protocol.effect_size == "paper_cohens_d" else stats.cohens_d
    return stats.or_none(fn, a, b)


def efficacy(protocol: StudyProtocol, perp, v, base) -> float | None:
    """Perp-only efficacy: the paper's raw ratio |mean perp| / |mean v|, or (perp - base) / (v - base)."""
    if protocol.efficacy == "raw_ratio":
        return stats.or_none(stats.paper_raw_ratio, perp, v)
    return stats.or_none(stats.perp_only_efficacy, perp, v, base)


def make_probes(kind: str, traits: Sequence[str], lm=None) -> dict:
    """trait -> Probe of the given kind ("lexical" or "model")."""
    return {t: make_probe(kind, t, lm=lm if kind == "model" else None) for t in traits}


# ----------------------------------------------------------------------------- prompt-level statistics

def row_clusters(plan: GenerationPlan) -> np.ndarray:
    """The prompt index of every plan row (n_rows,) (rows are prompt-major)."""
    return np.repeat(np.arange(len(plan.prompts)), plan.samples_per_prompt)


def prompt_comparison(a, b, clusters, steering_effect: float | None = None, margin_fraction: float = 0.2,
                      seed: int = 0) -> dict:
    """a vs b (rows paired by index, clustered by prompt) with the prompt as the unit: the mean of the per-prompt
    paired differences a - b with its cluster-bootstrap 95% interval and paired t p-value, and, when the steering
    effect (mean(v) - mean(base), prompt level) is given and non-zero, TOST at margin_fraction x |effect| with its
    power at a true difference of 0 for the number of prompts run."""
    diffs = clustered.paired_differences(a, b, clusters)
    rows = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    ci = clustered.cluster_bootstrap_ci(rows, clusters, seed=seed)
    sd = float(np.std(diffs, ddof=1))
    out = {"mean": float(diffs.mean()), "ci_low": ci.low, "ci_high": ci.high, "n_prompts": int(diffs.size),
           "sd_prompt": sd, "p": float(stats.paired_t_p(diffs)) if sd > 0 else 1.0}
    if steering_effect is not None and steering_effect != 0 and np.isfinite(steering_effect):
        margin = clustered.effect_margin(steering_effect, margin_fraction)
        tost = clustered.tost_paired(diffs, margin) if sd > 0 else None
        try:
            needed = clustered.units_for_power(sd, margin) if sd > 0 else None
        except InputError:                     # beyond the search limit: report "more than" as None
            needed = None
        out.update(margin=margin, margin_fraction=margin_fraction,
                   tost_p=None if tost is None else tost.p, equivalent=None if tost is None else tost.equivalent,
                   tost_power=clustered.tost_power(diffs.size, sd, margin) if sd > 0 else None,
                   prompts_for_80_power=needed)
    if sd > 0 and diffs.size >= 2:                # what this design can show equivalence to, at 80% power
        out["margin_for_80_power"] = clustered.margin_for_power(diffs.size, sd)
    return out


def mean_fluency(units: Sequence[Mapping], clusters) -> dict:
    """The mean over a family of conditions (e.g. the seeds' v + v_perp) of each one's prompt-level fluency
    (`fluency_summary`): {"repetition", "unsteered_loglik"}, None where a condition has no value."""
    summaries = [fluency_summary(u, clusters) for u in units]
    return {m: None if any(x[m] is None for x in summaries) else float(np.mean([x[m]["mean"] for x in summaries]))
            for m in ("repetition", "unsteered_loglik")}


def perturbation_comparison(base, v, families: Mapping[str, np.ndarray], clusters,
                            margin_fraction: float = 0.2) -> dict:
    """The prompt-level table entry of one steering vector: v - base (the steering effect), and for each family
    of perturbed conditions (name -> (seeds, rows) scores, e.g. "v_plus_perp", "matched") each seed's difference
    from v, the seeds pooled per row minus v (TOST at margin_fraction x the effect, with its power), and the
    seeds' heterogeneity (DerSimonian-Laird tau^2 and Cochran's Q, `clustered.heterogeneity`)."""
    effect = prompt_comparison(v, base, clusters)
    out = {"v_minus_base": effect}
    for name, family in families.items():
        family = np.atleast_2d(np.asarray(family, np.float64))
        per_seed = [prompt_comparison(rows, v, clusters, effect["mean"], margin_fraction) for rows in family]
        out[f"per_seed_{name}_minus_v"] = per_seed
        out[f"pooled_{name}_minus_v"] = prompt_comparison(family.mean(axis=0), v, clusters, effect["mean"],
                                                          margin_fraction)
        if len(per_seed) >= 2 and all(r["sd_prompt"] > 0 for r in per_seed):
            variances = [r["sd_prompt"] ** 2 / r["n_prompts"] for r in per_seed]
            out[f"heterogeneity_{name}_minus_v"] = clustered.heterogeneity([r["mean"] for r in per_seed],
                                                                           variances).to_dict()
    return out


def holm_entries(entries: Sequence[Mapping], key: str) -> None:
    """Holm-adjust `key` ("p" or "tost_p") across a table's entries (dicts) that have it: sets `key`_holm."""
    entries = [e for e in entries if e is not None and e.get(key) is not None]
    if entries:
        for entry, adjusted in zip(entries, clustered.holm([e[key] for e in entries])):
            entry[f"{key}_holm"] = float(adjusted)


def clustering(scores, clusters) -> dict:
    """ICC(1) and design effect of one condition's scores: how much the prompt explains."""
    icc = clustered.icc_oneway(scores, clusters)
    return {"icc": icc.icc, "design_effect": icc.design_effect, "samples_per_prompt": icc.mean_cluster_size}
