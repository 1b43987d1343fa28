"""The shipped prompt data (steerjax/data/*.json) and its loaders: schema, counts, disjointness and
lexical sanity checks that the contrastive pairs actually contrast the trait. No model is loaded."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from steerjax import data
from steerjax.errors import InputError

MAX_WORDS = 60  # hard limit for every shipped prompt
MAX_PAIR_WORDS = 40  # the contrastive pair prompts are kept shorter still


def words(text: str) -> list[str]:
    return text.split()


def norm(text: str) -> str:
    """Comparison key for duplicate detection: case, whitespace and trailing punctuation ignored."""
    return re.sub(r"\s+", " ", text.casefold()).strip().rstrip(".,;:!?")


def count(patterns: list[str], text: str) -> int:
    """Number of whole-word, case-insensitive matches of any pattern in text."""
    return sum(len(re.findall(rf"\b{p}\b", text, flags=re.IGNORECASE)) for p in patterns)


def all_pair_prompts() -> list[str]:
    out = []
    for trait in data.TRAITS:
        pos, neg = data.trait_pairs(trait)
        out += pos + neg
    return out


def all_environment_prompts() -> list[str]:
    return [p for prompts in data.environments().values() for p in prompts]


# --------------------------------------------------------------------------------------------------
# Schema, versions, counts
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["traits", "neutral_eval", "environments", "geometry_prompts", "probes",
                                  "neutral_pool"])
def test_files_ship_as_package_data(name):
    assert resources.files("steerjax.data").joinpath(f"{name}.json").is_file()


def test_traits_schema():
    doc = data.load_json("traits")
    assert doc["version"] == 1
    assert isinstance(doc["description"], str) and doc["description"].strip()
    assert tuple(doc["traits"]) == data.TRAITS
    for trait, info in doc["traits"].items():
        assert set(info) == {"description", "positive_label", "negative_label", "pairs"}, trait
        for key in ("description", "positive_label", "negative_label"):
            assert isinstance(info[key], str) and info[key].strip(), (trait, key)
        assert info["positive_label"] != info["negative_label"]
        assert len(info["pairs"]) == 50, trait
        for pair in info["pairs"]:
            assert set(pair) == {"positive", "negative", "context"}, (trait, pair)
            assert all(isinstance(pair[k], str) for k in pair)


def test_neutral_eval_schema():
    doc = data.load_json("neutral_eval")
    assert doc["version"] == 1 and doc["description"].strip()
    assert set(doc) == {"version", "description", "prompts"}
    assert len(doc["prompts"]) == 100
    assert data.neutral_eval_prompts() == doc["prompts"]


def test_environments_schema():
    doc = data.load_json("environments")
    assert doc["version"] == 1 and doc["description"].strip()
    assert data.ENVIRONMENTS == ("in_distribution", "topic_shift", "genre_shift", "safety_style")
    assert tuple(doc["environments"]) == data.ENVIRONMENTS
    for name, env in doc["environments"].items():
        assert set(env) == {"description", "prompts"}, name
        assert env["description"].strip()
        assert len(env["prompts"]) == 25, name
    envs = data.environments()
    assert tuple(envs) == data.ENVIRONMENTS
    assert all(len(v) == 25 for v in envs.values())


def test_probe_lexicons_are_versioned_and_cover_every_trait():
    from steerjax.probes import LexicalProbe

    doc = data.load_json("probes")
    assert doc["version"] == 1
    assert isinstance(doc["description"], str) and doc["description"].strip()
    assert set(doc) == {"version", "description", "command_verbs", "traits"}
    assert tuple(doc["traits"]) == data.TRAITS                      # every trait has a lexicon, no other
    verbs = doc["command_verbs"]
    assert verbs and all(isinstance(w, str) and w == w.strip().lower() and " " not in w for w in verbs)
    features = set(LexicalProbe("humor").features("Some text."))
    for trait in data.TRAITS:
        spec = doc["traits"][trait]
        assert set(spec) == {"positive", "negative", "weights"}, trait
        for side in ("positive", "negative"):
            assert set(spec[side]) == {"phrases", "regex"}, (trait, side)
            phrases = spec[side]["phrases"]
            assert phrases and all(isinstance(x, str) and x.strip() == x and x for x in phrases), (trait, side)
            for pattern in spec[side]["regex"]:
                re.compile(pattern)
        weights = spec["weights"]
        assert "bias" in weights and set(weights) - {"bias"} <= features, trait
        assert all(isinstance(w, float) for w in weights.values()), trait
    assert data.probe_lexicons() == doc
    data.probe_lexicons()["traits"].clear()                         # a copy: the cached file is untouched
    assert tuple(data.probe_lexicons()["traits"]) == data.TRAITS


def test_trait_pairs_are_aligned_with_trait_info():
    for trait in data.TRAITS:
        pos, neg = data.trait_pairs(trait)
        info = data.trait_info(trait)
        assert len(pos) == len(neg) == 50
        assert pos == [p["positive"] for p in info["pairs"]]
        assert neg == [p["negative"] for p in info["pairs"]]


def test_loaders_return_copies():
    data.neutral_eval_prompts().append("x")
    data.environments()["in_distribution"].append("x")
    data.trait_info("humor")["pairs"].clear()
    data.trait_pairs("humor")[0].clear()
    assert len(data.neutral_eval_prompts()) == 100
    assert len(data.environments()["in_distribution"]) == 25
    assert len(data.trait_info("humor")["pairs"]) == 50
    assert len(data.trait_pairs("humor")[0]) == 50


def test_trait_name_is_normalised():
    assert data.trait_pairs(" Formality ") == data.trait_pairs("formality")
    assert data.check_trait(" Humor ") == "humor"


@pytest.mark.parametrize("bad", ["sarcasm", "", "formal", None, 3])
def test_unknown_trait_names_valid_traits(bad):
    for fn in (data.trait_pairs, data.trait_info, data.check_trait):
        with pytest.raises(InputError) as info:
            fn(bad)
        for trait in data.TRAITS:
            assert trait in str(info.value)


# --------------------------------------------------------------------------------------------------
# String hygiene and disjointness
# --------------------------------------------------------------------------------------------------

def every_prompt() -> list[str]:
    geometry = data.geometry_prompts()
    contexts = [p["context"] for t in data.TRAITS for p in data.trait_info(t)["pairs"]]
    return (all_pair_prompts() + data.neutral_eval_prompts() + all_environment_prompts()
            + geometry["neutral"] + contexts)


def test_strings_are_clean():
    for text in every_prompt():
        assert isinstance(text, str) and text, text
        assert text == text.strip(), repr(text)
        assert "  " not in text and "\n" not in text, repr(text)
        assert text.isascii() and text.isprintable(), repr(text)  # no curly quotes / odd unicode
        assert 0 < len(words(text)) < MAX_WORDS, text


def test_pair_prompts_are_short():
    for text in all_pair_prompts():
        assert len(words(text)) < MAX_PAIR_WORDS, text


def test_openings_end_where_the_model_continues():
    """Pair prompts, eval prompts and all environments but safety_style (which holds questions) are
    open-ended: no sentence-final punctuation."""
    envs = data.environments()
    openings = (all_pair_prompts() + data.neutral_eval_prompts()
                + [p for name in data.ENVIRONMENTS if name != "safety_style" for p in envs[name]])
    for text in openings:
        assert not text.endswith((".", "!", "?")), text
    for text in envs["safety_style"]:
        assert text.endswith("?"), text


def test_no_duplicates_within_sets():
    sets = {"neutral_eval": data.neutral_eval_prompts(), "pairs": all_pair_prompts(),
            "geometry": data.geometry_prompts()["neutral"], **data.environments()}
    for name, prompts in sets.items():
        keys = [norm(p) for p in prompts]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, (name, dupes)


def test_no_duplicates_across_files():
    geometry = data.geometry_prompts()
    sets = {
        "neutral_eval": data.neutral_eval_prompts(),
        "environments": all_environment_prompts(),
        "pairs": all_pair_prompts(),
        "geometry_neutral": geometry["neutral"],
        "geometry_pairs": geometry["direction_pairs"]["positive"] + geometry["direction_pairs"]["negative"],
    }
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = {norm(p) for p in sets[a]} & {norm(p) for p in sets[b]}
            assert not shared, (a, b, shared)


def test_pairs_contrast_and_contexts_are_distinct():
    for trait in data.TRAITS:
        pairs = data.trait_info(trait)["pairs"]
        for p in pairs:
            assert norm(p["positive"]) != norm(p["negative"]), p
        contexts = [norm(p["context"]) for p in pairs]
        assert len(set(contexts)) == 50, trait


# --------------------------------------------------------------------------------------------------
# Lexical sanity: the pairs contrast the trait; the neutral sets carry no trait cue
# --------------------------------------------------------------------------------------------------

CONTRACTIONS = [r"\w+n't", r"(?:i|you|we|they|he|she|it|that|there|here|what|who|let)'(?:s|re|ll|ve|d|m)",
                r"y'all", r"'cause"]
SLANG = ["hey", "hi", "hiya", "yo", "gonna", "wanna", "gotta", "kinda", "like", "so", "okay", "ok", "guys",
         "dude", "stuff", "super", "totally", "awesome", "cool", "folks", "omg", "fyi", "ya", "ugh",
         "basically", "legit", "chill", "sick", "busted", "boss", "heads up", "no biggie"]
FORMAL = ["dear", "sincerely", "regret", "respectfully", "hereby", "kindly", "request", "inform", "advised",
          "therefore", "thereby", "however", "nevertheless", "subsequently", "enclosed", "regarding",
          "owing to", "in order to", "I am writing", "I wish", "I would", "please", "Mr", "Mrs", "Ms",
          "Dr", "approximately", "commence", "commenced"]
POLITE = ["please", "thank you", "thanks", "sorry", "kindly", "appreciate", "appreciated", "grateful",
          "would you", "could you", "could we", "would it be possible", "might be possible", "excuse me",
          "I hope", "hope you", "happy to", "no worries", "no rush", "gently", "lovely", "great"]
RUDE = ["now", "again", "already", "seriously", "obviously", "clearly", "stop", "move", "fix", "give",
        "send it", "get", "shut up", "junk", "mess", "awful", "disgusting", "lazy", "filthy", "racket",
        "jungle", "forever", "as usual", "even", "how hard", "finally", "sick of", "do not", "not"]
TRAIT_CUES = ["formal", "informal", "casual", "polite", "politely", "rude", "rudely", "funny", "humorous",
              "humor", "humour", "joke", "jokes", "hilarious", "serious", "seriously", "please", "thanks",
              "thank", "gonna", "wanna", "lol", "dude"]


def _mean(xs):
    return sum(xs) / len(xs)


def _instruction(prompt: str) -> str:
    """The first sentence: the instruction that names the register."""
    return prompt.split(". ", 1)[0]


def _opening(prompt: str) -> str:
    """Everything after the instruction: the opening of the response, where the register shows."""
    return prompt.split(". ", 1)[1]


@pytest.mark.parametrize("trait,pos_word,neg_word", [("formality", "formal", "casual"),
                                                     ("politeness", "polite", "rude"),
                                                     ("humor", "funny", "serious")])
def test_instructions_name_the_register(trait, pos_word, neg_word):
    pos, neg = data.trait_pairs(trait)
    for p, n in zip(pos, neg):
        assert count([pos_word], _instruction(p)) == 1 and count([neg_word], _instruction(p)) == 0, p
        assert count([neg_word], _instruction(n)) == 1 and count([pos_word], _instruction(n)) == 0, n
        assert "informal" not in p.lower(), p  # "formal" must not be a substring match for "informal"


def test_formality_lexicon():
    pos, neg = data.trait_pairs("formality")
    pos_open, neg_open = [_opening(p) for p in pos], [_opening(n) for n in neg]
    # formal openings use no contractions at all
    for p in pos_open:
        assert count(CONTRACTIONS, p) == 0, p
    informal = lambda t: count(CONTRACTIONS, t) + count(SLANG, t)
    formal = lambda t: count(FORMAL, t)
    assert _mean([informal(t) for t in neg_open]) > 1.0 > 5 * _mean([informal(t) for t in pos_open])
    assert _mean([formal(t) for t in pos_open]) > 5 * _mean([formal(t) for t in neg_open])
    # per pair, the casual opening is the more informal one in (nearly) every case
    wins = sum(informal(n) > informal(p) for p, n in zip(pos_open, neg_open))
    assert wins >= 45, wins


def test_politeness_lexicon():
    pos, neg = data.trait_pairs("politeness")
    pos_open, neg_open = [_opening(p) for p in pos], [_opening(n) for n in neg]
    for p in pos_open:
        assert count(POLITE, p) >= 1, p
    for n in neg_open:
        assert count(["please", "thank you", "thanks", "sorry", "kindly", "appreciate"], n) == 0, n
    assert _mean([count(POLITE, t) for t in pos_open]) > 4 * _mean([count(POLITE, t) for t in neg_open])
    assert _mean([count(RUDE, t) for t in neg_open]) > 2 * _mean([count(RUDE, t) for t in pos_open])


def test_humor_lexicon():
    pos, neg = data.trait_pairs("humor")
    for p, n in zip(pos, neg):
        assert count(["funny"], p) == 1 and count(["serious"], p) == 0, p
        assert count(["serious"], n) == 1 and count(["funny"], n) == 0, n
    # the funny openings are not shorter on average (no length confound in the "wrong" direction)
    assert _mean([len(words(_opening(p))) for p in pos]) >= _mean([len(words(_opening(n))) for n in neg])


def test_neutral_sets_carry_no_trait_cue():
    envs = data.environments()
    neutral = data.neutral_eval_prompts() + [p for name in data.ENVIRONMENTS for p in envs[name]]
    for text in neutral:
        assert count(TRAIT_CUES, text) == 0, text
    # neutral openings are register-neutral: no contractions or chat slang
    for text in data.neutral_eval_prompts() + envs["in_distribution"]:
        assert count(CONTRACTIONS, text) == 0, text


# --------------------------------------------------------------------------------------------------
# The neutral pool of the identifiability study (neutral_pool.json)
# --------------------------------------------------------------------------------------------------

def test_neutral_pool_schema():
    doc = data.load_json("neutral_pool")
    assert set(doc) == {"version", "description", "prompts"}
    assert doc["version"] == 1
    assert isinstance(doc["description"], str) and doc["description"].strip()
    pool = data.neutral_pool()
    assert pool == doc["prompts"]
    assert len(pool) >= 200
    pool.append("x")                                                # a copy: the cached file is untouched
    assert len(data.neutral_pool()) == len(doc["prompts"])


def test_neutral_pool_strings_are_clean_and_unique():
    pool = data.neutral_pool()
    for text in pool:
        assert isinstance(text, str) and text, text
        assert text == text.strip(), repr(text)
        assert "  " not in text and "\n" not in text, repr(text)
        assert text.isascii() and text.isprintable(), repr(text)
        assert 3 <= len(words(text)) <= 30, text
    keys = [norm(p) for p in pool]
    assert len(set(keys)) == len(keys), {k for k in keys if keys.count(k) > 1}


def test_neutral_pool_is_disjoint_from_the_other_prompt_sets():
    geometry = data.geometry_prompts()

    def strings(node):                                              # every string anywhere in traits.json
        if isinstance(node, str):
            return [node]
        if isinstance(node, (dict, list)):
            return [s for v in (node.values() if isinstance(node, dict) else node) for s in strings(v)]
        return []                                                   # the version number

    traits = strings(data.load_json("traits"))
    assert {p[k] for t in data.TRAITS for p in data.trait_info(t)["pairs"] for k in p} <= set(traits)
    sets = {
        "neutral_eval": data.neutral_eval_prompts(),
        "environments": all_environment_prompts(),
        "traits": traits,
        "geometry_neutral": geometry["neutral"],
        "geometry_pairs": geometry["direction_pairs"]["positive"] + geometry["direction_pairs"]["negative"],
    }
    pool = {norm(p) for p in data.neutral_pool()}
    for name, prompts in sets.items():
        shared = pool & {norm(p) for p in prompts}
        assert not shared, (name, shared)


@pytest.mark.parametrize("trait", ["formality", "politeness", "humor"])
def test_neutral_pool_carries_no_lexicon_marker(trait):
    """No pool prompt contains a plain marker phrase (either side) of the LexicalProbe's lexicon for the
    trait: whole words, case-insensitive, a space matching any run of whitespace."""
    spec = data.probe_lexicons()["traits"][trait]
    phrases = spec["positive"]["phrases"] + spec["negative"]["phrases"]
    patterns = [re.escape(p).replace(r"\ ", r"\s+") for p in phrases]
    for text in data.neutral_pool():
        hits = [p for p, pat in zip(phrases, patterns) if re.search(rf"\b{pat}\b", text, flags=re.IGNORECASE)]
        assert not hits, (text, hits)
    for text in data.neutral_pool():
        assert count(TRAIT_CUES, text) == 0 and count(CONTRACTIONS, text) == 0, text
