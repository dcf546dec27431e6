"""Tiny random models with a real (byte-level) tokenizer, built on the fly for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCAB = 260  # 256 byte symbols + 4 specials


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for j, special in enumerate(("<unk>", "<s>", "</s>", "<pad>")):
        vocab[special] = 256 + j
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str = "llama", intermediate: int = 96, layers: int = 2, tie: bool = False):
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=intermediate,
                  num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=257, eos_token_id=258, rope_theta=10000.0)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = (Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM)(cfg).float().eval()
    # Non-trivial norm weights and biases, so that norm fusion and bias handling are really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_tiny(path: Path, arch: str = "llama", **kw) -> Path:
    model = tiny_model(arch, **kw)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
