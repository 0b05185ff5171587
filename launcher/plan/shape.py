"""A decoder's shapes from its config.json, and its parameter count by arithmetic (no torch import).

Llama-family layouts (llama, mistral, qwen2, qwen3): embeddings, per layer q/k/v/o projections
(q/k/v biases for qwen2), a gated MLP (gate, up, down), two RMSNorms (plus q/k norms for qwen3),
a final norm and an lm_head unless tied. Other model types have no shape here: the plan then
counts parameters on the meta device (the test oracle for this arithmetic) and says what it
cannot predict.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> Optional["ModelShape"]:
        """The shape of a Llama-family config.json, or None for another architecture."""
        if config.get("model_type") not in FAMILIES:
            return None
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                model_type=config["model_type"],
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or (128 if config["model_type"] == "qwen3" else hidden // heads)),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                # As transformers builds them: qwen2 always has q/k/v biases (no o_proj bias, no MLP
                # bias), mistral has none, llama and qwen3 follow attention_bias for all four.
                qkv_bias=config["model_type"] == "qwen2" or (attention_bias and config["model_type"] != "mistral"),
                o_bias=attention_bias and config["model_type"] in ("llama", "qwen3"),
                mlp_bias=bool(config.get("mlp_bias", False)) and config["model_type"] == "llama",
                qk_norm=config["model_type"] == "qwen3",
            )
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_tensors(self) -> Dict[str, int]:
        """Element count of each parameter tensor of one decoder layer."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        tensors = {"q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h,
                   "gate_proj": h * i, "up_proj": h * i, "down_proj": i * h,
                   "input_layernorm": h, "post_attention_layernorm": h}
        if self.qkv_bias:
            tensors.update(q_bias=q, k_bias=kv, v_bias=kv)
        if self.o_bias:
            tensors.update(o_bias=h)
        if self.mlp_bias:
            tensors.update(gate_bias=i, up_bias=i, down_bias=h)
        if self.qk_norm:
            tensors.update(q_norm=self.head_dim, k_norm=self.head_dim)
        return tensors

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * sum(self.layer_tensors().values()) + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The most parameters one module owns (DeepSpeed's `largest_layer_params`): the embedding, usually."""
        t = self.layer_tensors()
        q_proj = t["q_proj"] + t.get("q_bias", 0)  # a Linear owns its weight and bias
        return max(self.vocab * self.hidden, t["gate_proj"] + t.get("gate_bias", 0), q_proj)

    def persistent_params(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps whole on every rank: tensors of at most `threshold` elements."""
        small = sum(n for n in self.layer_tensors().values() if n <= threshold) * self.layers
        return small + (self.hidden if self.hidden <= threshold else 0)
