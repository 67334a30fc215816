"""A deterministic synthetic preference task, a local tokenizer and small Llama-style models.

In the spirit of the controlled-sentiment experiment of the DPO paper (Rafailov et al., 2023,
section 6.1), scaled down so that it trains on a CPU in seconds:

* a small vocabulary of words, each with a known sentiment score: positive (+1 or +0.5),
  negative (-1 or -0.5) or neutral (0);
* prompts are short "review openings" (neutral words plus, sometimes, a mood word);
* a known *base distribution* writes completions: a few words, each drawn from the positive,
  negative or neutral group with probabilities set by the prompt's mood;
* the true reward of a completion is the mean sentiment score of its words (in [-1, 1]), a
  known function of its tokens, standing in for the paper's sentiment classifier;
* a preference pair is two base-distribution completions of the same prompt, the one with
  the higher true reward chosen (ties are redrawn).

Everything is generated from an integer seed with ``random.Random`` (no global state), so the
same seed gives the same rows on every machine. :func:`build_tokenizer` builds a word-level
``PreTrainedTokenizerFast`` locally (no download): special tokens, the task words, and
reserved padding entries up to ``vocab_size`` (real tokenizers have large vocabularies and the
lm_head's cost grows with it).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

POSITIVE = {"great": 1.0, "excellent": 1.0, "wonderful": 1.0, "brilliant": 1.0, "superb": 1.0, "loved": 1.0,
            "good": 0.5, "fun": 0.5, "nice": 0.5, "charming": 0.5, "enjoyable": 0.5, "moving": 0.5}
NEGATIVE = {"awful": -1.0, "terrible": -1.0, "boring": -1.0, "hated": -1.0, "dreadful": -1.0, "worst": -1.0,
            "bad": -0.5, "dull": -0.5, "weak": -0.5, "bland": -0.5, "messy": -0.5, "slow": -0.5}
NEUTRAL = ("the", "movie", "film", "plot", "story", "cast", "acting", "music", "ending", "script", "scenes",
           "director", "was", "is", "and", "a", "very", "quite", "really", "overall", "this", "it", "with", "of")
TOPICS = ("the movie", "the film", "this film", "the plot", "the acting", "the music", "the ending", "the script",
          "the cast", "the story", "the director", "the scenes")
MOOD_WORDS = {"pos": ("honestly", "surprisingly"), "neg": ("frankly", "sadly"), "mixed": ("well", "so")}
# P(positive word), P(negative word) for each mood; the rest are neutral.
MOOD_PROBS = {"pos": (0.30, 0.12), "neg": (0.12, 0.30), "mixed": (0.20, 0.20)}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORD_SCORES = {**POSITIVE, **NEGATIVE, **{w: 0.0 for w in NEUTRAL}}


def task_words() -> list[str]:
    """Every word the task uses, in a fixed order (prompt words included)."""
    words = list(POSITIVE) + list(NEGATIVE) + list(NEUTRAL)
    for mood in MOOD_WORDS.values():
        words += list(mood)
    for topic in TOPICS:
        words += topic.split()
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def true_reward(words) -> float:
    """Mean sentiment score of the completion's words (0 for an empty completion); in [-1, 1]."""
    words = [w for w in words if w not in SPECIAL_TOKENS]
    if not words:
        return 0.0
    return sum(WORD_SCORES.get(w, 0.0) for w in words) / len(words)


@dataclass(frozen=True)
class Prompt:
    text: str
    mood: str


def sample_prompt(rng: random.Random) -> Prompt:
    mood = rng.choice(tuple(MOOD_PROBS))
    words = [rng.choice(MOOD_WORDS[mood])] + rng.choice(TOPICS).split() + [rng.choice(("was", "is"))]
    return Prompt(" ".join(words), mood)


def sample_completion(rng: random.Random, mood: str, min_words: int = 3, max_words: int = 7) -> list[str]:
    """Words of one completion drawn from the base distribution for a prompt of this mood."""
    p_pos, p_neg = MOOD_PROBS[mood]
    out = []
    for _ in range(rng.randint(min_words, max_words)):
        u = rng.random()
        if u < p_pos:
            out.append(rng.choice(tuple(POSITIVE)))
        elif u < p_pos + p_neg:
            out.append(rng.choice(tuple(NEGATIVE)))
        else:
            out.append(rng.choice(NEUTRAL))
    return out


def make_sft_rows(n: int, seed: int) -> list[dict]:
    """``n`` rows ``{"prompt", "completion"}`` from the base distribution (the SFT data)."""
    rng = random.Random(f"sft-{seed}")
    rows = []
    for _ in range(n):
        p = sample_prompt(rng)
        rows.append({"prompt": p.text, "completion": " " + " ".join(sample_completion(rng, p.mood))})
    return rows


def make_preference_rows(n: int, seed: int, max_tries: int = 20) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}``.

    Both completions come from the base distribution for the same prompt; the one with the
    higher true reward is chosen (draws with equal reward are redrawn).
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    rng = random.Random(f"pref-{seed}")
    rows = []
    while len(rows) < n:
        p = sample_prompt(rng)
        for _ in range(max_tries):
            a, b = sample_completion(rng, p.mood), sample_completion(rng, p.mood)
            ra, rb = true_reward(a), true_reward(b)
            if ra != rb:
                break
        else:
            continue
        (c, rc), (r, rr) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))
        rows.append({"prompt": p.text, "chosen": " " + " ".join(c), "rejected": " " + " ".join(r),
                     "chosen_reward": rc, "rejected_reward": rr})
    return rows


def build_tokenizer(vocab_size: int = 512):
    """A word-level ``PreTrainedTokenizerFast`` over the task words, padded to ``vocab_size``.

    Special tokens: ``<pad>`` (pad), ``<s>`` (bos, not added automatically), ``</s>`` (eos),
    ``<unk>``. Entries past the task words are ``<reserved_i>``, never produced by the task.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = task_words()
    base = len(SPECIAL_TOKENS) + len(words)
    if vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} (special tokens + task words), got {vocab_size}")
    tokens = list(SPECIAL_TOKENS) + words + [f"<reserved_{i}>" for i in range(vocab_size - base)]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    return tokenizer


MODEL_SIZES = {
    # name: hidden, layers, heads, kv heads, intermediate
    "tiny": (32, 2, 4, 2, 64),
    "small": (64, 2, 4, 2, 128),
    "base": (128, 4, 8, 4, 256),
}


def build_model(tokenizer, size: str = "small", *, seed: int = 0, dtype=None, tie_word_embeddings: bool = False):
    """A randomly initialised ``LlamaForCausalLM`` of one of :data:`MODEL_SIZES` for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    hidden, layers, heads, kv_heads, inter = MODEL_SIZES[size]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, attention_dropout=0.0)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
