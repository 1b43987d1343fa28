"""Trait probes phi(o) -> [0, 1] for generated text (paper Section 6, "Semantic probes").

Every probe scores ONLY the text it is given. The caller must pass the generated continuation (the
new tokens, decoded), never prompt + continuation: the paper's released code scored the prompt too,
which leaks the steering instruction ("Write a formal message ...") into the score.

Three kinds, all following the `Probe` protocol (`name`, `trait`, `score(texts) -> (N,) float64`,
higher = more of the trait):

* `LexicalProbe(trait)`: marker lexicons plus style features, combined by a fixed logistic formula
  (the paper's kind of heuristic, written fresh); lexicons and weights are versioned data,
  `steerjax/data/probes.json` (`data.probe_lexicons()`). Matching is whole-word and case-insensitive, so
  "informal" never counts as the formal marker "formal" (the released probe's `'formal' in label`
  bug).
* `ModelProbe(lm, trait)`: sigmoid of the log-probability margin between a positive and a negative
  judgement continuation ("\\nThe tone of the text above is formal." vs "... informal.") under a
  steerjax `LanguageModel`.
* `HFClassifierProbe(model_dir, trait, positive_label)`: any local Hugging Face
  sequence-classification folder; the score is the softmax probability of the label whose name
  equals `positive_label` (case-insensitive equality, never substring). torch is imported only here.

Convention shared by all probes: an empty or whitespace-only text carries no evidence and scores
exactly 0.5 (margin 0.0 for `ModelProbe.margin`).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from steerjax.checks import check_positive_int
from steerjax.data import TRAITS, check_trait, probe_lexicons
from steerjax.errors import InputError, ModelNotFoundError
from steerjax.model import TokenBatch

PROBE_KINDS = ("lexical", "model", "hf")
NEUTRAL = 0.5


@runtime_checkable
class Probe(Protocol):
    """A trait scorer. `score` takes generated continuations (not prompts) and returns an (N,)
    float array in [0, 1], higher = more of `trait`; empty / whitespace texts score 0.5."""

    name: str
    trait: str

    def score(self, texts: Sequence[str]) -> np.ndarray: ...


def _as_texts(texts) -> list[str]:
    """A list of str from a str (one text) or a sequence of str; anything else is an InputError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    try:
        texts = list(texts)
    except TypeError:
        raise InputError(f"texts must be a sequence of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"texts must be strings; item {i} is {type(t).__name__}")
    return texts


def _one_text(text) -> str:
    if not isinstance(text, str):
        raise InputError(f"expected one text (a str), got {type(text).__name__}")
    return text.translate(_APOSTROPHES)


def _sigmoid(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


# --------------------------------------------------------------------------------------------------
# Lexical probe
# --------------------------------------------------------------------------------------------------

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
_CONTRACTION = re.compile(
    r"\b[A-Za-z]+(?:n't|'re|'ll|'ve|'m|'d)\b|\b(?:it|that|what|there|here|he|she|let|who|where|how)'s\b",
    re.IGNORECASE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_EMOJI = re.compile(r"[\U0001F300-\U0001FAFF\U00002600-\U000027BF\U0001F000-\U0001F2FF]"
                    r"|(?<![\w])[:;=][-']?[)(DPp3](?![\w])|<3")
_SHOUT = re.compile(r"\b[A-Z]{3,}\b")


def _compile_lexicon(entry: dict[str, list[str]]) -> re.Pattern:
    """One pattern for a lexicon entry {"phrases": [...], "regex": [...]} of probes.json: the phrases as one
    alternation (longest first, so "would you kindly" wins over "would you"; whole-word, a space matching
    any run of whitespace), then the regexes verbatim; case-insensitive, non-overlapping."""
    parts = sorted(set(entry["phrases"]), key=len, reverse=True)
    alts = [r"\s+".join(re.escape(w) for w in p.split()) for p in parts]
    pattern = r"\b(?:" + "|".join(alts) + r")\b"
    if entry["regex"]:
        pattern = "|".join([pattern, *entry["regex"]])
    return re.compile(pattern, re.IGNORECASE)


class LexicalProbe:
    """Lexical trait heuristic: marker lexicons + style features -> logistic score in [0, 1].

    For a text with n words (n >= 1 after clamping) the features are

      positive, negative  log1p(100 * marker hits / n)      (probes.json lexicons, whole-word, no case)
      contractions        log1p(100 * contractions / n)     ("don't", "we're", "it's", ...)
      exclamations        log1p(100 * "!" count / n)
      emoji               log1p(100 * (emoji + emoticons like ":)") / n)
      shouting            log1p(100 * ALL-CAPS words of >= 3 letters / n)
      imperatives         log1p(100 * sentences opening with a bare command verb / n)  (probes.json)
      sentence_length     clip((mean words per sentence - 15) / 10, -1.5, 1.5)
      capitalised         2 * (fraction of sentences starting with an upper-case letter) - 1

    and score = sigmoid(w["bias"] + sum_k w[k] * f_k), w = probes.json's weights of the trait (also
    `self.weights`). "Fix it." opens with a command verb and counts as an imperative; "Please fix it."
    opens with "please" and does not. An empty or whitespace-only text scores 0.5. The probe is a
    heuristic: negation ("not funny") and irony are not modelled. Pass generated continuations only,
    not the prompt."""

    def __init__(self, trait: str):
        self.trait = check_trait(trait)
        self.name = f"lexical-{self.trait}"
        lexicons = probe_lexicons()
        spec = lexicons["traits"][self.trait]
        self.weights = dict(spec["weights"])
        self._positive = _compile_lexicon(spec["positive"])
        self._negative = _compile_lexicon(spec["negative"])
        self._command_verbs = tuple(lexicons["command_verbs"])

    def __repr__(self) -> str:
        return f"LexicalProbe(trait={self.trait!r})"

    def marker_counts(self, text: str) -> tuple[int, int]:
        """(positive, negative) marker hits in `text` (whole-word, case-insensitive)."""
        text = _one_text(text)
        return len(self._positive.findall(text)), len(self._negative.findall(text))

    def features(self, text: str) -> dict[str, float]:
        """The feature values f_k entering the formula (see the class docstring)."""
        text = _one_text(text)
        words = _WORD.findall(text)
        n = max(len(words), 1)
        rate = lambda count: math.log1p(100.0 * count / n)
        sentences = [s for s in _SENTENCE_SPLIT.split(text.strip()) if _WORD.search(s)]
        lengths = [len(_WORD.findall(s)) for s in sentences] or [0]
        starts = [re.search(r"[A-Za-z]", s) for s in sentences]
        starts = [m.group(0) for m in starts if m]
        firsts = [_WORD.findall(s)[0].lower() for s in sentences]
        pos, neg = self.marker_counts(text)
        return {
            "positive": rate(pos),
            "negative": rate(neg),
            "contractions": rate(len(_CONTRACTION.findall(text))),
            "exclamations": rate(text.count("!")),
            "emoji": rate(len(_EMOJI.findall(text))),
            "shouting": rate(len(_SHOUT.findall(text))),
            "imperatives": rate(sum(f in self._command_verbs for f in firsts)),
            "sentence_length": float(np.clip((np.mean(lengths) - 15.0) / 10.0, -1.5, 1.5)),
            "capitalised": 2.0 * (sum(c.isupper() for c in starts) / len(starts)) - 1.0 if starts else 0.0,
        }

    def logit(self, text: str) -> float:
        """bias + sum_k w_k f_k (0.0 for empty text)."""
        if not _one_text(text).strip():
            return 0.0
        f = self.features(text)
        return self.weights["bias"] + sum(w * f[k] for k, w in self.weights.items() if k != "bias")

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) float64 scores in [0, 1] for generated continuations (not prompts)."""
        texts = _as_texts(texts)
        return np.array([float(_sigmoid(self.logit(t))) if t.strip() else NEUTRAL for t in texts], np.float64)


# --------------------------------------------------------------------------------------------------
# Model-based probe
# --------------------------------------------------------------------------------------------------

DEFAULT_CONTINUATIONS: dict[str, tuple[str, str]] = {
    "formality": ("\nThe tone of the text above is formal.", "\nThe tone of the text above is informal."),
    "politeness": ("\nThe tone of the text above is polite.", "\nThe tone of the text above is rude."),
    "humor": ("\nThe tone of the text above is humorous.", "\nThe tone of the text above is serious."),
}


class ModelProbe:
    """Judgement-continuation probe under a steerjax LanguageModel.

    margin(text) = log p(positive_continuation | text) - log p(negative_continuation | text), each a
    teacher-forced sum of the continuation tokens' log-probabilities; score = sigmoid(margin).

    Token convention: the context is `lm.tokenizer(text.rstrip())["input_ids"]` (the tokenizer's
    default special tokens, as `lm.tokenize`), cut to its last `max_text_tokens` tokens, followed by
    `lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]`; the two are tokenized
    separately so the scored continuation tokens are identical for every text. Texts are batched
    (left-padded, widths rounded up to a multiple of 32 to limit recompilation). Empty / whitespace
    texts get margin 0.0 and score 0.5. Pass generated continuations only, not the prompt.

    With both continuations given, `trait` may be any label; otherwise it must be one of TRAITS."""

    def __init__(self, lm, trait: str, positive_continuation: str | None = None,
                 negative_continuation: str | None = None, batch_size: int = 16, max_text_tokens: int = 512):
        if positive_continuation is None or negative_continuation is None:
            trait = check_trait(trait)
            pos_default, neg_default = DEFAULT_CONTINUATIONS[trait]
            positive_continuation = pos_default if positive_continuation is None else positive_continuation
            negative_continuation = neg_default if negative_continuation is None else negative_continuation
        elif not isinstance(trait, str) or not trait.strip():
            raise InputError(f"trait must be a non-empty string, got {trait!r}")
        for label, cont in (("positive_continuation", positive_continuation),
                            ("negative_continuation", negative_continuation)):
            if not isinstance(cont, str) or not cont.strip():
                raise InputError(f"{label} must be a non-empty string, got {cont!r}")
        if positive_continuation == negative_continuation:
            raise InputError("positive_continuation and negative_continuation are identical; the margin "
                             "would always be 0")
        batch_size = check_positive_int(batch_size, "batch_size")
        max_text_tokens = check_positive_int(max_text_tokens, "max_text_tokens")
        if not hasattr(lm, "forward") or not hasattr(lm, "tokenizer"):
            raise InputError(f"ModelProbe needs a steerjax LanguageModel, got {type(lm).__name__}")
        self.lm = lm
        self.trait = trait.strip().lower() if trait.strip().lower() in TRAITS else trait
        self.name = f"model-{self.trait}"
        self.positive_continuation = positive_continuation
        self.negative_continuation = negative_continuation
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        tok = lm.tokenizer
        self._pos_ids = list(tok(positive_continuation, add_special_tokens=False)["input_ids"])
        self._neg_ids = list(tok(negative_continuation, add_special_tokens=False)["input_ids"])
        limit = lm.config.max_position_embeddings
        longest = max(len(self._pos_ids), len(self._neg_ids))
        if longest >= limit:
            raise InputError(f"continuations of {longest} tokens leave no room for text in the model's "
                             f"context of {limit}")
        self.max_text_tokens = min(max_text_tokens, limit - longest)

    def __repr__(self) -> str:
        return (f"ModelProbe(trait={self.trait!r}, positive_continuation={self.positive_continuation!r}, "
                f"negative_continuation={self.negative_continuation!r})")

    def _context_ids(self, text: str) -> list[int]:
        ids = list(self.lm.tokenizer(text.rstrip())["input_ids"])
        return ids[-self.max_text_tokens:]

    def continuation_logprobs(self, texts: Sequence[str], continuation_ids: Sequence[int]) -> np.ndarray:
        """(N,) float64: sum of log p(continuation token | text + previous continuation tokens) for
        non-empty texts (empty / whitespace texts are not allowed here)."""
        import jax
        import jax.numpy as jnp

        texts = _as_texts(texts)
        cont = [int(i) for i in continuation_ids]
        S = len(cont)
        out = np.zeros(len(texts), np.float64)
        contexts = [self._context_ids(t) for t in texts]
        if any(len(c) == 0 for c in contexts):
            raise InputError("continuation_logprobs needs non-empty texts (no tokens after tokenization)")
        target = jnp.asarray(cont, jnp.int32)
        for start in range(0, len(texts), self.batch_size):
            rows = [c + cont for c in contexts[start:start + self.batch_size]]
            n_real = len(rows)
            B = n_real if len(texts) <= self.batch_size else self.batch_size
            rows = rows + [rows[0]] * (B - n_real)  # fixed batch shape: fewer compilations
            longest = max(len(r) for r in rows)
            width = max(longest, min(-(-longest // 32) * 32, self.lm.config.max_position_embeddings))
            ids = np.zeros((B, width), np.int32)
            mask = np.zeros((B, width), np.int32)
            for r, seq in enumerate(rows):
                ids[r, width - len(seq):] = seq
                mask[r, width - len(seq):] = 1
            logits = self.lm.forward(TokenBatch(ids, mask)).logits
            # left padding aligns every row's continuation at the end: tokens T-S..T-1 are predicted
            # by positions T-S-1..T-2
            lp = jax.nn.log_softmax(logits[:, width - S - 1:width - 1, :].astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(lp, jnp.broadcast_to(target[None, :, None], (B, S, 1)), axis=-1)
            out[start:start + n_real] = np.asarray(picked[..., 0].sum(-1), np.float64)[:n_real]
        return out

    def margin(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) float64 log-prob margins log p(pos | text) - log p(neg | text); 0.0 for empty texts."""
        texts = _as_texts(texts)
        out = np.zeros(len(texts), np.float64)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        if keep:
            sub = [texts[i] for i in keep]
            out[keep] = (self.continuation_logprobs(sub, self._pos_ids)
                         - self.continuation_logprobs(sub, self._neg_ids))
        return out

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) float64 sigmoid(margin) in [0, 1] for generated continuations (not prompts)."""
        return _sigmoid(self.margin(texts))


# --------------------------------------------------------------------------------------------------
# Hugging Face classifier plug-in (the only place torch is imported)
# --------------------------------------------------------------------------------------------------

class HFClassifierProbe:
    """Any LOCAL Hugging Face sequence-classification folder as a probe.

    Loads AutoTokenizer and AutoModelForSequenceClassification from `model_dir` with
    local_files_only=True, use_safetensors=True and no remote code; score = softmax probability of
    the label in config.id2label whose name equals `positive_label` case-insensitively (exact name,
    never a substring: "formal" does not match "informal"). Needs torch (imported lazily here).
    Texts are truncated to the model's maximum length. Empty / whitespace texts score 0.5. Pass
    generated continuations only, not the prompt."""

    def __init__(self, model_dir, trait: str, positive_label: str, batch_size: int = 32):
        if not isinstance(trait, str) or not trait.strip():
            raise InputError(f"trait must be a non-empty string, got {trait!r}")
        if not isinstance(positive_label, str) or not positive_label.strip():
            raise InputError(f"positive_label must be a non-empty string, got {positive_label!r}")
        batch_size = check_positive_int(batch_size, "batch_size")
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelNotFoundError(f"HF classifier folder {str(model_dir)!r} does not exist or is not a "
                                     "directory (only local folders are loaded, nothing is downloaded)")
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as err:
            raise InputError("HFClassifierProbe needs torch and transformers (pip install torch "
                             f"transformers); import failed: {err}") from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            raise ModelNotFoundError(f"could not load a safetensors sequence-classification model and "
                                     f"tokenizer from {str(folder)!r}: {err}") from err
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        wanted = positive_label.strip().lower()
        matches = [i for i, lab in id2label.items() if lab.strip().lower() == wanted]
        labels = [id2label[i] for i in sorted(id2label)]
        if not matches:
            raise InputError(f"positive_label {positive_label!r} is not a label of {str(folder)!r}; "
                             f"available labels: {labels}")
        if len(matches) > 1:
            raise InputError(f"positive_label {positive_label!r} matches several labels of {str(folder)!r} "
                             f"case-insensitively: {[id2label[i] for i in matches]}")
        self._torch = torch
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.trait = trait.strip().lower() if trait.strip().lower() in TRAITS else trait
        self.name = f"hf-{self.trait}"
        self.model_dir = str(folder)
        self.positive_label = id2label[matches[0]]
        self.label_index = matches[0]
        self.labels = labels
        self.batch_size = batch_size
        limits = [getattr(tokenizer, "model_max_length", None),
                  getattr(model.config, "max_position_embeddings", None)]
        limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < 1_000_000]
        self.max_length = min(limits) if limits else None

    def __repr__(self) -> str:
        return f"HFClassifierProbe({self.model_dir!r}, trait={self.trait!r}, positive_label={self.positive_label!r})"

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(N, num_labels) float64 softmax probabilities (rows for empty texts are NaN)."""
        torch = self._torch
        texts = _as_texts(texts)
        out = np.full((len(texts), len(self.labels)), np.nan)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        for start in range(0, len(keep), self.batch_size):
            idx = keep[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt",
                                 truncation=self.max_length is not None, max_length=self.max_length)
            with torch.inference_mode():
                logits = self.model(**enc).logits
            out[idx] = torch.softmax(logits.double(), dim=-1).numpy()
        return out

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) float64 probability of `positive_label` for generated continuations (not prompts)."""
        probs = self.probabilities(texts)
        scores = probs[:, self.label_index] if len(probs) else np.zeros(0)
        return np.where(np.isnan(scores), NEUTRAL, scores)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

def make_probe(kind: str, trait: str, lm=None, **kw) -> Probe:
    """Build a probe: kind "lexical" (LexicalProbe(trait)), "model" (ModelProbe(lm, trait, **kw),
    needs `lm`) or "hf" (HFClassifierProbe(model_dir=..., trait, positive_label=..., **kw))."""
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in PROBE_KINDS:
        raise InputError(f"unknown probe kind {kind!r}; choose one of {', '.join(PROBE_KINDS)}")
    cls = {"lexical": LexicalProbe, "model": ModelProbe, "hf": HFClassifierProbe}[key]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "trait", "lm"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise InputError(f"{key} probe got unexpected options {unknown}; it accepts {sorted(allowed) or 'none'}")
    if key == "lexical":
        return LexicalProbe(trait)
    if key == "model":
        if lm is None:
            raise InputError("a 'model' probe needs a steerjax LanguageModel: make_probe('model', trait, lm=lm)")
        return ModelProbe(lm, trait, **kw)
    missing = [k for k in ("model_dir", "positive_label") if k not in kw]
    if missing:
        raise InputError(f"an 'hf' probe needs {missing}: make_probe('hf', trait, model_dir=..., positive_label=...)")
    return HFClassifierProbe(trait=trait, **kw)
