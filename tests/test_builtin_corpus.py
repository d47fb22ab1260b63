"""The embedded offline corpus: deterministic, well-formed, tokenizable, and learnable.

"Learnable" is checked with cheap n-gram statistics instead of training a model: if a bigram
model beats a unigram model by a wide margin, and words cluster within documents, then a
trained LM has real structure to find and perplexity can tell a good model from a poor one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from qgplm.data.builtin import SPECIAL_TOKENS, _lexicon, build_tokenizer, generate_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(train_docs=40, valid_docs=8, test_docs=8)


@pytest.fixture(scope="module")
def timed_corpus() -> tuple[dict[str, str], float]:
    start = time.perf_counter()
    corpus = generate_corpus(seed=0)
    return corpus, time.perf_counter() - start


@pytest.fixture(scope="module")
def corpus(timed_corpus) -> dict[str, str]:
    return timed_corpus[0]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus["train"])


def _docs(text: str) -> list[str]:
    return text.split("\n\n")


def _unk_rate(tokenizer, text: str) -> float:
    ids = tokenizer(text)["input_ids"]
    return ids.count(tokenizer.unk_token_id) / len(ids)


# --- n-gram statistics (bits per word, add-one smoothing, estimated on train) ----------------


def _unigram_entropy(train: list[str], heldout: list[str], vocab_size: int) -> float:
    counts, n = Counter(train), len(train)
    return -sum(math.log2((counts[w] + 1) / (n + vocab_size)) for w in heldout) / len(heldout)


def _bigram_entropy(train: list[str], heldout: list[str], vocab_size: int) -> float:
    """Cross-entropy of the next word given the previous one."""
    unigrams, bigrams = Counter(train), Counter(zip(train, train[1:], strict=False))
    pairs = list(zip(heldout, heldout[1:], strict=False))
    return -sum(math.log2((bigrams[p] + 1) / (unigrams[p[0]] + vocab_size)) for p in pairs) / len(pairs)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_same_text():
    assert generate_corpus(seed=7, **SMALL) == generate_corpus(seed=7, **SMALL)


def test_different_seed_gives_different_text():
    a, b = generate_corpus(seed=0, **SMALL), generate_corpus(seed=1, **SMALL)
    for split in ("train", "valid", "test"):
        assert a[split] != b[split]


def test_split_does_not_depend_on_other_split_sizes():
    """Each split has its own random stream: a longer train split leaves valid/test unchanged."""
    a = generate_corpus(seed=3, **SMALL)
    b = generate_corpus(seed=3, **{**SMALL, "train_docs": 60})
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert b["train"].startswith(a["train"])


def test_text_does_not_depend_on_hash_seed():
    """No global random state and no set/dict-order leaks: a fresh process with another
    PYTHONHASHSEED generates byte-identical text."""
    code = (
        "import hashlib, json; from qgplm.data.builtin import generate_corpus; "
        f"c = generate_corpus(seed=5, **{SMALL!r}); "
        "print(hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest())"
    )
    here = hashlib.sha256(json.dumps(generate_corpus(seed=5, **SMALL), sort_keys=True).encode()).hexdigest()
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


# --- format and size ---------------------------------------------------------------------------


def test_format(corpus):
    eos = SPECIAL_TOKENS["eos"]
    for split, text in corpus.items():
        docs = _docs(text)
        assert all(doc.endswith(" . " + eos) for doc in docs), split
        assert all(doc.count(eos) == 1 for doc in docs), split
        for doc in docs:
            assert "\n" not in doc and "  " not in doc and doc == doc.strip()


def test_doc_counts():
    corpus = generate_corpus(seed=2, train_docs=11, valid_docs=3, test_docs=5)
    assert [len(_docs(corpus[s])) for s in ("train", "valid", "test")] == [11, 3, 5]


def test_splits_are_nonempty_and_disjoint(corpus):
    docs = {split: set(_docs(text)) for split, text in corpus.items()}
    assert all(docs.values())
    assert not docs["train"] & docs["valid"]
    assert not docs["train"] & docs["test"]
    assert not docs["valid"] & docs["test"]


def test_default_size_and_speed(timed_corpus):
    corpus, seconds = timed_corpus
    words = {split: len(text.split()) for split, text in corpus.items()}
    n_types = len(set(corpus["train"].split()))
    print(f"\nbuiltin corpus: words {words}, {n_types} train word types, generated in {seconds:.2f} s")
    assert 250_000 <= words["train"] <= 400_000
    assert 20_000 <= words["valid"] <= 30_000 and 20_000 <= words["test"] <= 30_000
    assert 400 <= n_types <= 1500
    assert seconds < 3.0


# --- structure ---------------------------------------------------------------------------------


def test_bigram_model_clearly_beats_unigram_model(corpus, tokenizer):
    train, valid = corpus["train"].split(), corpus["valid"].split()
    vocab_size = len(tokenizer)
    h1 = _unigram_entropy(train, valid, vocab_size)
    h2 = _bigram_entropy(train, valid, vocab_size)
    print(
        f"\nvalid: unigram {h1:.2f} bits (ppl {2**h1:.1f}), add-one bigram {h2:.2f} bits "
        f"(ppl {2**h2:.1f}), gain {h1 - h2:.2f} bits, vocab {vocab_size}"
    )
    assert h1 - h2 >= 1.5
    assert 2**h1 < vocab_size / 3  # Zipfian, far from uniform


def test_words_cluster_within_documents(corpus):
    """Document topics and entity reuse: the two halves of one document share many more word
    types than halves of different documents (context a long-range model can exploit)."""
    halves = []
    for doc in _docs(corpus["valid"]):
        words = doc.split()
        mid = len(words) // 2
        halves.append((set(words[:mid]), set(words[mid:])))

    def overlap(a: set[str], b: set[str]) -> float:
        return len(a & b) / len(a | b)

    same = sum(overlap(a, b) for a, b in halves) / len(halves)
    other = sum(overlap(halves[i][0], halves[i - 1][1]) for i in range(len(halves))) / len(halves)
    assert same > 1.5 * other, (same, other)


def test_verbs_agree_with_sentence_initial_subject(corpus):
    """The main verb right after a sentence-initial subject noun has its number (or is past)."""
    lex = _lexicon()
    singular = {n.sg for n in lex.nouns.items}
    plural = {n.pl for n in lex.nouns.items}
    verbs = [v for group in lex.verbs.values() for v in group.items]
    form = {v.third: "sg" for v in verbs} | {v.base: "pl" for v in verbs} | {v.past: "past" for v in verbs}
    checked = 0
    for sentence in corpus["valid"].replace(SPECIAL_TOKENS["eos"], "").split(" . "):
        words = sentence.split()
        noun_at = next((i for i, w in enumerate(words) if w in singular or w in plural), None)
        if noun_at is None or noun_at + 1 >= len(words) or words[noun_at + 1] not in form:
            continue
        number = "sg" if words[noun_at] in singular else "pl"
        assert form[words[noun_at + 1]] in (number, "past"), sentence
        checked += 1
    assert checked > 1000


# --- tokenizer ---------------------------------------------------------------------------------


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token) == (
        "<pad>", "<unk>", "<eos>", "<eos>")
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (
        0, 1, 2, 2)
    assert SPECIAL_TOKENS == {"pad": "<pad>", "unk": "<unk>", "eos": "<eos>"}


def test_vocabulary_is_train_types_plus_specials_ordered_by_frequency(corpus, tokenizer):
    counts = Counter(corpus["train"].split())
    vocab = tokenizer.get_vocab()
    assert set(vocab) == set(counts) | {"<pad>", "<unk>"}
    words = sorted((w for w in vocab if w not in SPECIAL_TOKENS.values()), key=vocab.get)
    assert vocab[words[0]] == 3 and sorted(vocab.values()) == list(range(len(vocab)))
    keys = [(-counts[w], w) for w in words]
    assert keys == sorted(keys)


def test_unseen_words_are_unk(tokenizer):
    ids = tokenizer("the qqqzzz .")["input_ids"]
    assert ids[1] == tokenizer.unk_token_id and tokenizer.unk_token_id not in (ids[0], ids[2])


def test_heldout_splits_have_almost_no_unk(corpus, tokenizer):
    rates = {split: _unk_rate(tokenizer, corpus[split]) for split in ("valid", "test")}
    print(f"\n<unk> rate: {rates}")
    assert all(rate < 0.01 for rate in rates.values())


def test_encoding_is_whitespace_word_split(corpus, tokenizer):
    doc = _docs(corpus["valid"])[0]
    ids = tokenizer(doc)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == doc.split()
    assert tokenizer.decode(ids) == doc


def test_save_load_round_trip(corpus, tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    text = "\n\n".join(_docs(corpus["test"])[:20])
    expected = tokenizer(text)["input_ids"]
    for loader in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert loaded(text)["input_ids"] == expected
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert (loaded.pad_token_id, loaded.unk_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2, 2)


def test_tokenizer_is_deterministic(corpus, tokenizer):
    assert build_tokenizer(corpus["train"]).get_vocab() == tokenizer.get_vocab()
