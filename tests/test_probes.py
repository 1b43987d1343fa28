"""Trait probes: lexical heuristic, model-based judgement margin (against a plain per-text loop) and the
local Hugging Face classifier plug-in (against an independent torch softmax)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import steerjax as sj
from steerjax.probes import (TRAITS, HFClassifierProbe, LexicalProbe, ModelProbe, Probe,
                             make_probe)

FORMAL = ("Dear Mr. Smith, I am writing to inform you that the quarterly report has been completed. "
          "Furthermore, we shall provide the attached analysis regarding performance at your earliest "
          "convenience. Sincerely, Jane Doe.")
CASUAL = "hey dude!! gonna be late lol, traffic is nuts rn, wanna grab tacos after? cya"
POLITE = "Could you please send me the file? Thank you so much, I really appreciate your help."
RUDE = "Shut up. Whatever, that is a stupid idea. Fix it now, idiot."
FUNNY = "Haha, why did the chicken cross the road? To get to the other side! lol, what a silly joke 😂"
DRY = ("The report presents the quarterly data. According to the analysis, revenue increased by four "
       "percent. Further results are documented in the appendix.")


# ---------------------------------------------------------------------------------------------- lexical

@pytest.mark.parametrize("trait, high, low", [("formality", FORMAL, CASUAL), ("politeness", POLITE, RUDE),
                                              ("humor", FUNNY, DRY)])
def test_lexical_orders_clear_examples(trait, high, low):
    probe = LexicalProbe(trait)
    s_high, s_low = probe.score([high, low])
    assert s_high > 0.7 and s_low < 0.3 and s_high > s_low
    assert isinstance(probe, Probe) and probe.trait == trait and probe.name == f"lexical-{trait}"


def test_lexical_scores_in_unit_interval_and_empty_is_neutral():
    texts = [FORMAL, CASUAL, POLITE, RUDE, FUNNY, DRY, "", "   \n\t", "!!!!!!!!", "😂" * 50,
             "LOL " * 200, "furthermore " * 300, "x"]
    for trait in TRAITS:
        s = LexicalProbe(trait).score(texts)
        assert s.shape == (len(texts),) and s.dtype == np.float64
        assert np.all((s >= 0) & (s <= 1)) and np.all(np.isfinite(s))
        assert s[6] == 0.5 and s[7] == 0.5
    assert LexicalProbe("formality").score([]).shape == (0,)
    assert LexicalProbe("formality").score("A single text.").shape == (1,)  # a bare str is one text


def test_lexical_word_boundaries_informal_is_not_formal():
    probe = LexicalProbe("formality")
    assert probe.marker_counts("formal") == (1, 0)
    # "informal" contains "formal" as a substring: whole-word matching must not count it as formal
    assert probe.marker_counts("This is informal, informally written.") == (0, 2)
    assert probe.score(["This is informal."])[0] < 0.5
    assert probe.marker_counts("Formally, FURTHERMORE, furthermore!") == (3, 0)  # case-insensitive
    assert probe.marker_counts("shallow regardless herbs") == (0, 0)  # "shall", "regard", "herb..." inside words
    assert LexicalProbe("politeness").marker_counts("pleased thankless") == (0, 0)
    assert LexicalProbe("humor").marker_counts("pundit jokester hahaha") == (1, 0)  # only "hahaha"
    # curly apostrophes are normalised before matching contractions / markers
    assert probe.features("we don\u2019t know")["contractions"] == probe.features("we don't know")["contractions"] > 0


def test_lexical_formula_is_the_documented_logistic():
    probe = LexicalProbe("politeness")
    f = probe.features(POLITE)
    z = probe.weights["bias"] + sum(w * f[k] for k, w in probe.weights.items() if k != "bias")
    assert probe.score([POLITE])[0] == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-12)


def test_unknown_trait_and_bad_input_errors():
    with pytest.raises(sj.InputError, match="formality, politeness, humor"):
        LexicalProbe("sarcasm")
    with pytest.raises(sj.InputError, match="item 1 is int"):
        LexicalProbe("humor").score(["fine", 3])
    with pytest.raises(sj.InputError, match="unknown probe kind 'svm'.*lexical, model, hf"):
        make_probe("svm", "formality")
    with pytest.raises(sj.InputError, match="needs a steerjax LanguageModel"):
        make_probe("model", "formality")
    with pytest.raises(sj.InputError, match="unexpected options"):
        make_probe("lexical", "formality", threshold=0.3)
    with pytest.raises(sj.InputError, match="model_dir"):
        make_probe("hf", "formality", positive_label="formal")
    assert isinstance(make_probe("Lexical", "Humor"), LexicalProbe)


def test_probes_module_does_not_import_torch():
    code = "import sys, steerjax.probes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def lm(smollm2):
    """The embedded SmolLM2-135M (conftest's session fixture) with its tokenizer already built (the
    GGUF tokenizer conversion takes ~10 s, paid here once instead of inside the first test)."""
    smollm2.tokenizer
    return smollm2


def reference_logprob(lm, text: str, continuation: str) -> float:
    """Plain loop: one unpadded sequence, full log_softmax, teacher-forced continuation tokens."""
    import jax

    tok = lm.tokenizer
    ctx = list(tok(text.rstrip())["input_ids"])
    cont = list(tok(continuation, add_special_tokens=False)["input_ids"])
    ids = np.array(ctx + cont, np.int32)
    logp = np.asarray(jax.nn.log_softmax(lm.forward(ids).logits[0].astype("float32"), axis=-1), np.float64)
    return float(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


def test_model_probe_margin_matches_per_text_loop(lm):
    # 3 non-empty texts, batch_size 2 -> two left-padded batches, the second filled with a dummy row
    # (both 64 wide, so one compilation)
    probe = ModelProbe(lm, "formality", batch_size=2)
    texts = [FORMAL, "  ", CASUAL, DRY]
    margins = probe.margin(texts)
    assert margins[1] == 0.0  # empty text: margin 0 (score 0.5), and it does not disturb the others
    ref = [reference_logprob(lm, t, probe.positive_continuation)
           - reference_logprob(lm, t, probe.negative_continuation) for t in (FORMAL, CASUAL, DRY)]
    np.testing.assert_allclose(margins[[0, 2, 3]], ref, atol=1e-4, rtol=0)


def test_model_probe_orders_formal_above_slang(lm):
    probe = make_probe("model", "formality", lm=lm)
    assert isinstance(probe, Probe) and probe.name == "model-formality"
    scores = probe.score([FORMAL, CASUAL, ""])
    s_formal, s_slang, s_empty = scores
    assert 0 <= s_slang < s_formal <= 1 and s_empty == 0.5
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-probe.margin([FORMAL, CASUAL, ""]))), atol=1e-12)


def test_model_probe_custom_continuations_and_errors(lm):
    probe = ModelProbe(lm, "sarcasm", positive_continuation="\nThat was sarcastic.",
                       negative_continuation="\nThat was sincere.")
    assert probe.trait == "sarcasm" and probe.score(["Oh great, another Monday."]).shape == (1,)
    with pytest.raises(sj.InputError, match="valid traits"):
        ModelProbe(lm, "sarcasm")  # no defaults for an unknown trait
    with pytest.raises(sj.InputError, match="identical"):
        ModelProbe(lm, "humor", positive_continuation=" x", negative_continuation=" x")


# ---------------------------------------------------------------------------------------------- HF plug-in

WORDS = ["dear", "sir", "sincerely", "regards", "hey", "dude", "lol", "gonna", "the", "report", "is",
         "ready", "formal", "informal", "text", "we", "shall", "see", "you"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64,
                        id2label={0: "informal", 1: "formal"}, label2id={"informal": 0, "formal": 1})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("tiny_bert_cls")
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_hf_probe_matches_torch_softmax(tiny_classifier):
    import torch

    folder, model, tokenizer = tiny_classifier
    probe = HFClassifierProbe(folder, "formality", "formal")
    assert probe.label_index == 1 and probe.labels == ["informal", "formal"]
    texts = ["dear sir the report is ready sincerely", "hey dude lol gonna see you", "we shall see",
             "unknown words only", ""]
    got = probe.score(texts)
    ref = []
    for t in texts[:-1]:  # one unpadded text at a time, independent of the probe's batching
        with torch.no_grad():
            logits = model(**tokenizer(t, return_tensors="pt")).logits[0].double()
        ref.append(torch.softmax(logits, -1)[1].item())
    np.testing.assert_allclose(got[:-1], ref, atol=1e-6)
    assert got[-1] == 0.5
    # the other label, case-insensitive exact name
    informal = HFClassifierProbe(folder, "formality", "INFORMAL").score(texts[:-1])
    np.testing.assert_allclose(informal, 1 - np.asarray(ref), atol=1e-6)
    assert isinstance(make_probe("hf", "formality", model_dir=folder, positive_label="formal"), Probe)


def test_hf_probe_label_matching_is_exact(tiny_classifier, tmp_path):
    folder, model, tokenizer = tiny_classifier
    # "formal" must select label 1 "formal", never label 0 "informal" (the released probe's bug)
    assert HFClassifierProbe(folder, "formality", "formal").positive_label == "formal"
    with pytest.raises(sj.InputError, match=r"'polite'.*available labels: \['informal', 'formal'\]"):
        HFClassifierProbe(folder, "politeness", "polite")
    with pytest.raises(sj.InputError, match="available labels"):
        HFClassifierProbe(folder, "formality", "orma")  # a substring is not a match
    # a model with only "informal": asking for "formal" must fail rather than match the substring
    model.config.id2label = {0: "informal", 1: "neutral"}
    model.config.label2id = {"informal": 0, "neutral": 1}
    only = tmp_path / "only_informal"
    model.save_pretrained(only)
    tokenizer.save_pretrained(only)
    model.config.id2label = {0: "informal", 1: "formal"}
    model.config.label2id = {"informal": 0, "formal": 1}
    with pytest.raises(sj.InputError, match=r"available labels: \['informal', 'neutral'\]"):
        HFClassifierProbe(only, "formality", "formal")


def test_hf_probe_load_errors(tiny_classifier, tmp_path, monkeypatch):
    folder, _, _ = tiny_classifier
    with pytest.raises(sj.ModelNotFoundError, match="does not exist"):
        HFClassifierProbe(tmp_path / "missing", "formality", "formal")
    with pytest.raises(sj.ModelNotFoundError, match="could not load"):
        HFClassifierProbe(tmp_path, "formality", "formal")  # an empty folder
    pickled = tmp_path / "bin_only"  # weights only under the pickle name: safetensors-only loading refuses
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(sj.ModelNotFoundError, match="could not load a safetensors"):
        HFClassifierProbe(pickled, "formality", "formal")
    monkeypatch.setitem(sys.modules, "torch", None)  # simulate torch not installed
    with pytest.raises(sj.InputError, match="needs torch and transformers"):
        HFClassifierProbe(folder, "formality", "formal")
