"""Tiny models, tokenizers and preference data built locally for the tests (nothing is downloaded).

``tiny_model_dir()`` builds, once per process, a randomly initialised 2-layer Llama-style model
and a word-level tokenizer (BOS added, EOS ``</s>``) saved together in a temporary folder.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import tempfile

WORDS = ("the a one two red blue green cat dog bird fish sees eats likes runs jumps big small fast slow "
         "happy sad good bad yes no and or but very not is are was here there now then up down").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(words=WORDS, *, eos=True, extra_words=()):
    """A PreTrainedTokenizerFast over a fixed word vocabulary: whitespace split, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(words) + list(extra_words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = dict(bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    if eos:
        kwargs["eos_token"] = "</s>"
    else:
        tk.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def build_llama(vocab_size, *, seed=0, layers=2, hidden=32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model_dir(path, *, seed=0, tokenizer=None):
    """Save a tiny Llama and its tokenizer to ``path``; returns ``path``."""
    tokenizer = tokenizer or build_tokenizer()
    model = build_llama(len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_tmp_root = None


def _root():
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = tempfile.mkdtemp(prefix="dpo_fast_tests_")
        atexit.register(shutil.rmtree, _tmp_root, True)
    return _tmp_root


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> str:
    """Folder with the shared tiny model + tokenizer (built once per process; treat as read-only)."""
    return save_model_dir(os.path.join(_root(), "tiny-llama"))


def make_rows(n, *, seed=0, min_prompt=2, max_prompt=12, max_completion=10):
    """``n`` text preference rows over :data:`WORDS` (completions start with a space)."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": words(min_prompt, max_prompt), "chosen": " " + words(1, max_completion),
             "rejected": " " + words(1, max_completion)} for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
