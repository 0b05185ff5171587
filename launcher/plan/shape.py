"""A decoder's shapes from its config.json, and its parameter count by arithmetic (no torch import).

Llama-family layouts (llama, mistral, qwen2, qwen3): embeddings, per layer q/k/v/o projections
(q/k/v biases for qwen2), a gated MLP (gate, up, down), two RMSNorms (plus q/k norms for qwen3),
a final norm and an lm_head unless tied.
Mixture-of-experts layouts (qwen3_moe, mixtral, olmoe, qwen2_moe), as transformers 5 builds them:
the same attention (olmoe normalises the whole q and k projections, qwen3_moe each head), and in
each MoE layer a block of a router (`mlp.gate`, E x hidden) and E experts fused into two tensors
(`mlp.experts.gate_up_proj`, E x 2I x hidden; `down_proj`, E x hidden x I), plus for qwen2_moe a
shared expert (a gated MLP every token runs) and its sigmoid gate (hidden -> 1). qwen3_moe and
qwen2_moe keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`).
Other model types have no shape here: the plan then counts parameters on the meta device (the
test oracle for this arithmetic) and says what it cannot predict.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe")  # trained and tested here (launcher.moe)
# config.json keys that count experts (or experts per token) in the MoE families transformers knows.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
ALL_BIASES = ("llama", "qwen3", "qwen3_moe", "olmoe")  # attention_bias sets q, k, v and o biases alike
# The keys each MoE family reads its expert count from: two aliases, except for qwen2_moe (transformers
# 5 writes qwen3_moe's as num_local_experts, the hub's configs as num_experts).
EXPERT_KEYS = {"qwen3_moe": ("num_experts", "num_local_experts"), "mixtral": ("num_local_experts", "num_experts"),
               "olmoe": ("num_experts", "num_local_experts"), "qwen2_moe": ("num_experts",)}


def is_moe_config(config: Dict[str, Any]) -> bool:
    """Whether a config.json describes a mixture of experts, of any family: an expert count above 0
    (or, with none given, experts per token above 0), also in a nested config (text_config, ffn_config)."""
    counts = [config[k] for k in EXPERT_COUNT_KEYS if k in config]
    if counts:
        return any(_positive(c) for c in counts)
    if _positive(config.get("num_experts_per_tok")):
        return True
    return any(is_moe_config(value) for value in config.values() if isinstance(value, dict))


def _positive(value: Any) -> bool:
    if isinstance(value, (list, tuple)):  # some families give one count per modality
        return any(_positive(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # a dense layer's MLP width
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    q_norm: int = 0  # elements of the q and k norms' weights (0: none)
    k_norm: int = 0
    # Mixture of experts (none when moe_layers is 0).
    moe_layers: int = 0  # layers whose MLP is a MoE block; the others are dense
    experts: int = 0  # routed experts per MoE layer
    top_k: int = 0  # experts each token runs
    moe_intermediate: int = 0  # each expert's MLP width
    shared_expert: bool = False  # qwen2_moe: a shared gated MLP and its sigmoid gate per MoE block
    shared_intermediate: int = 0

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> Optional["ModelShape"]:
        """The shape of a Llama-family or tested MoE config.json, or None for another architecture."""
        model_type = config.get("model_type")
        if model_type not in FAMILIES + MOE_FAMILIES:
            return None
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads))
            attention_bias = bool(config.get("attention_bias", False))
            # As transformers builds them: qwen2 always has q/k/v biases (no o_proj bias, no MLP bias),
            # qwen2_moe as its qkv_bias says; mistral and mixtral have none; the others follow
            # attention_bias for all four.
            if model_type == "qwen2_moe":
                qkv_bias = bool(config.get("qkv_bias", True))
            else:
                qkv_bias = model_type == "qwen2" or (attention_bias and model_type in ALL_BIASES)
            if model_type in ("qwen3", "qwen3_moe"):
                q_norm, k_norm = head_dim, head_dim  # per head
            elif model_type == "olmoe":
                q_norm, k_norm = hidden, hidden // heads * kv_heads  # over the whole projections
            else:
                q_norm = k_norm = 0
            layers = int(config["num_hidden_layers"])
            return cls(
                model_type=model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                o_bias=attention_bias and model_type in ALL_BIASES,
                mlp_bias=bool(config.get("mlp_bias", False)) and model_type == "llama",
                q_norm=q_norm, k_norm=k_norm, **moe_fields(model_type, config, layers),
            )
        except (KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError):
            return None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.moe_layers > 0

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def layer_tensors(self, moe: bool = False) -> Dict[str, int]:
        """Element count of each parameter tensor of one decoder layer (a MoE layer's with moe=True)."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        tensors = {"q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h,
                   "input_layernorm": h, "post_attention_layernorm": h}
        if self.qkv_bias:
            tensors.update(q_bias=q, k_bias=kv, v_bias=kv)
        if self.o_bias:
            tensors.update(o_bias=h)
        if self.q_norm:
            tensors.update(q_norm=self.q_norm, k_norm=self.k_norm)
        if not moe:
            i = self.intermediate
            tensors.update(gate_proj=h * i, up_proj=h * i, down_proj=i * h)
            if self.mlp_bias:
                tensors.update(gate_bias=i, up_bias=i, down_bias=h)
            return tensors
        return {**tensors, **self.moe_block_tensors()}

    def moe_block_tensors(self) -> Dict[str, int]:
        """Element count of each parameter tensor of one MoE block: what ZeRO-3 gathers at once."""
        h, e, i, s = self.hidden, self.experts, self.moe_intermediate, self.shared_intermediate
        tensors = {"router": e * h, "experts.gate_up_proj": e * 2 * i * h, "experts.down_proj": e * h * i}
        if self.shared_expert:
            tensors.update({"shared_expert.gate_proj": h * s, "shared_expert.up_proj": h * s,
                            "shared_expert.down_proj": s * h, "shared_expert_gate": h})
        return tensors

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        layers = self.dense_layers * sum(self.layer_tensors().values())
        if self.moe:
            layers += self.moe_layers * sum(self.layer_tensors(moe=True).values())
        return embed * (1 if self.tied else 2) + layers + self.hidden

    @property
    def expert_params(self) -> int:
        """Parameters of the routed experts, all MoE layers (0 for a dense model)."""
        t = self.moe_block_tensors() if self.moe else {}
        return self.moe_layers * (t.get("experts.gate_up_proj", 0) + t.get("experts.down_proj", 0))

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the routed experts it is not sent to (E - k of E)."""
        return self.params - (self.expert_params * (self.experts - self.top_k) // self.experts if self.moe else 0)

    @property
    def moe_block_params(self) -> int:
        """One MoE block's parameters: all its experts, its router (and shared expert); 0 when dense.
        The launcher makes the block a ZeRO-3 leaf module (launcher.moe), so it is gathered whole."""
        return sum(self.moe_block_tensors().values()) if self.moe else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The most parameters gathered at once (DeepSpeed's `largest_layer_params`): the embedding,
        usually; a MoE block when larger (ZeRO-3 gathers it as one leaf)."""
        t = self.layer_tensors()
        q_proj = t["q_proj"] + t.get("q_bias", 0)  # a Linear owns its weight and bias
        mlp = t["gate_proj"] + t.get("gate_bias", 0) if self.dense_layers else 0
        return max(self.embedding_params, mlp, q_proj, self.moe_block_params)

    @property
    def largest_expert_tensor(self) -> int:
        """The largest single tensor of a MoE block (its experts' gate_up_proj); 0 when dense."""
        return max(self.moe_block_tensors().values()) if self.moe else 0

    @property
    def active_mlp_params(self) -> int:
        """MLP parameters one token runs through, all layers: dense MLPs, and in MoE layers the router,
        k experts and the shared expert."""
        dense = self.dense_layers * 3 * self.hidden * self.intermediate
        if not self.moe:
            return dense
        t = self.moe_block_tensors()
        routed = t["experts.gate_up_proj"] + t["experts.down_proj"]
        return dense + self.moe_layers * (sum(t.values()) - routed + routed * self.top_k // self.experts)

    def persistent_params(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps whole on every rank: tensors of at most `threshold` elements."""
        small = lambda tensors: sum(n for n in tensors.values() if n <= threshold)  # noqa: E731
        kept = self.dense_layers * small(self.layer_tensors())
        if self.moe:
            kept += self.moe_layers * small(self.layer_tensors(moe=True))
        return kept + (self.hidden if self.hidden <= threshold else 0)


def moe_fields(model_type: str, config: Dict[str, Any], layers: int) -> Dict[str, Any]:
    """The MoE fields of ModelShape from a config.json, as transformers reads them ({} for a dense family)."""
    if model_type not in MOE_FAMILIES:
        return {}
    experts = int(next(config[k] for k in EXPERT_KEYS[model_type] if k in config))  # StopIteration: no count given
    if experts < 1 and model_type in ("mixtral", "olmoe"):
        raise ValueError("a MoE block with no experts")  # no shape: counted on the meta device
    if model_type in ("mixtral", "olmoe"):  # every layer a MoE block, each expert intermediate_size wide
        moe_layers, width = layers, int(config["intermediate_size"])
    else:  # qwen3_moe, qwen2_moe: a layer is sparse unless listed dense or off the sparse step
        dense, step = set(config.get("mlp_only_layers") or []), int(config.get("decoder_sparse_step", 1))
        moe_layers = sum(1 for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        width = int(config["moe_intermediate_size"])
    shared = model_type == "qwen2_moe"
    return dict(moe_layers=moe_layers, experts=experts, top_k=int(config["num_experts_per_tok"]), moe_intermediate=width,
                shared_expert=shared, shared_intermediate=int(config["shared_expert_intermediate_size"]) if shared else 0)
