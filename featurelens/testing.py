"""Tiny randomly initialised models of every supported family, built offline from configs.

Used by the unit tests (and handy for users' own structural tests): no download, no tokenizer needed.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                                  "olmo", "olmo2", "gpt2", "gpt_neox")
POSTNORM_FAMILIES: tuple[str, ...] = ("gemma2", "gemma3_text", "olmo2")
"""Families whose attention / MLP outputs pass through a norm before the residual add."""


def tiny_config(family: str, vocab_size: int = 128) -> Any:
    """A small config (2-4 layers, d_model 64) for one family."""
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if family == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **common)
    if family == "olmo":
        return tf.OlmoConfig(num_key_value_heads=2, **common)
    if family == "olmo2":
        return tf.Olmo2Config(num_key_value_heads=2, **common)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, **common)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=256, n_inner=96,
                             bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown tiny family {family!r}: choose from {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str, seed: int = 0, vocab_size: int = 128) -> Any:
    """A randomly initialised causal LM of one family, in eval mode and float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size), attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    return model


class CharTokenizer:
    """A dependency-free character tokenizer for tests: ids 0/1/2 are pad/BOS/EOS, text maps into 3..vocab-1."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int = 128, skip_spaces: bool = False) -> None:
        self.vocab_size = vocab_size
        self.skip_spaces = skip_spaces
        """Drop whitespace characters (a second, different tokenization of the same text for alignment tests)."""

    @property
    def all_special_ids(self) -> list[int]:
        return [0, 1, 2]

    def get_vocab(self) -> dict[str, int]:
        vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
        vocab.update({f"c{i}": i for i in range(3, self.vocab_size)})
        return vocab

    def encode(self, text: str) -> list[int]:
        """Characters 3..vocab-1 map to themselves (printable ASCII survives a round trip); others wrap."""
        return [ord(ch) if 3 <= ord(ch) < self.vocab_size else 3 + ord(ch) % (self.vocab_size - 3) for ch in text]

    def __call__(self, text: str, add_special_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict[str, list[Any]]:
        keep = [i for i, ch in enumerate(text) if not (self.skip_spaces and ch.isspace())]
        ids = self.encode("".join(text[i] for i in keep))
        out: dict[str, list[Any]] = {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}
        if return_offsets_mapping:
            out["offset_mapping"] = ([(0, 0)] if add_special_tokens else []) + [(i, i + 1) for i in keep]
        return out

    def save_pretrained(self, path: Any) -> None:
        """Write its settings (so an export of a tiny test model has a tokenizer file beside it)."""
        import json
        from pathlib import Path

        (Path(path) / "char_tokenizer.json").write_text(json.dumps({"vocab_size": self.vocab_size,
                                                                     "skip_spaces": self.skip_spaces}))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i >= 3]
        return "".join("?" if i < 3 else chr(i) for i in ids)


def random_transcoders(arch: str, n_layers: int, d: int, width: int, skip: bool = True, scale: float = 0.1,
                       seed: int = 0, k: int = 5, dtype: torch.dtype = torch.float32) -> list[Any]:
    """One randomly perturbed transcoder per layer (``blocks.L.ln2.hook_normalized`` -> ``blocks.L.hook_mlp_out``),
    in eval mode: JumpReLU thresholds small and positive, BatchTopK / Matryoshka thresholds set, so that a
    good share of latents fire on unit-scale inputs."""
    from featurelens.saes import SAEConfig, get_architecture

    out = []
    for layer in range(n_layers):
        cfg = SAEConfig(architecture=arch, d_in=d, d_sae=width, k=k, hook_name=f"blocks.{layer}.ln2.hook_normalized",
                        target_hook_name=f"blocks.{layer}.hook_mlp_out", hook_layer=layer, apply_b_dec_to_input=False,
                        skip=skip)
        tc: Any = get_architecture(arch)(cfg)
        g = torch.Generator().manual_seed(seed + layer)
        with torch.no_grad():
            for p in tc.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
            if arch == "jumprelu":
                tc.log_threshold.copy_((0.1 * torch.rand(width, generator=g) + 0.01).log())
            if arch in ("batchtopk", "matryoshka"):
                tc.threshold.fill_(0.2)
                tc.threshold_initialised.fill_(True)
        out.append(tc.to(dtype).eval())
    return out


def random_clt(n_layers: int, d: int, width: int, skip: bool = True, scale: float = 0.1, seed: int = 0, k: int = 5,
               threshold: float = 0.2, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly perturbed cross-layer transcoder over blocks ``0 .. n_layers-1`` (``ln2.hook_normalized`` ->
    ``hook_mlp_out``), in eval mode, per-layer thresholds at ``threshold``."""
    from featurelens.saes import SAEConfig
    from featurelens.saes.clt import CrossLayerTranscoder

    cfg = SAEConfig(architecture="clt", d_in=d * n_layers, d_sae=width * n_layers, k=k,
                    hook_name="blocks.*.ln2.hook_normalized", target_hook_name="blocks.*.hook_mlp_out",
                    apply_b_dec_to_input=False, skip=skip, extra={"n_layers": n_layers})
    clt = CrossLayerTranscoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        clt.threshold.fill_(threshold)
        clt.threshold_initialised.fill_(True)
    return clt.to(dtype).eval()
