"""ModelConfig: the one description of a decoder-only model, parsed from a Hugging Face
`config.json`. Llama, Mistral, Qwen2 and Qwen3 are the same network with a few switches
(qkv bias, q/k norm, sliding window, explicit head_dim); Mixtral, Qwen2-MoE and Qwen3-MoE are
Mistral, Qwen2 and Qwen3 with a mixture-of-experts feed-forward (`MoeConfig`). This file is
where those switches are read, so the model code never looks at `architectures`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# architecture -> the switches that differ between families.
_FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "MixtralForCausalLM": {"moe": True},
    "Qwen2MoeForCausalLM": {"qkv_bias": True, "moe": True},
    "Qwen3MoeForCausalLM": {"qk_norm": True, "moe": True},
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# config.json fields without which the network's shape is unknown (the rest have defaults).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ModelConfigError(ValueError):
    """A config.json (or generation_config.json) that does not describe a model we can run;
    the message names the file and what is wrong with it."""


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a checkpoint directory nor a preset."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """The mixture-of-experts feed-forward: a softmax router picks `num_experts_per_tok` of
    `num_experts` SwiGLU experts per token (weights renormalised over the chosen ones with
    `norm_topk_prob`); Qwen2-MoE adds a shared expert behind a sigmoid gate."""

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # per expert
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    # Per layer: True for the MoE block, False for a dense MLP of ModelConfig.intermediate_size
    # (Qwen's mlp_only_layers / decoder_sparse_step). Empty: every layer is sparse.
    sparse_layers: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                             f"({self.num_experts})]")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: None for full attention, else the window in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    moe: MoeConfig | None = None  # None: every layer has a dense MLP

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"{len(self.sliding_windows)} layer types for {self.num_layers} layers"
            )
        if self.moe is not None and not self.moe.sparse_layers:
            object.__setattr__(self, "moe", dataclasses.replace(self.moe, sparse_layers=(True,) * self.num_layers))
        if self.moe is not None and len(self.moe.sparse_layers) != self.num_layers:
            raise ValueError(f"{len(self.moe.sparse_layers)} sparse-layer flags for {self.num_layers} layers")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.sparse_layers[layer]

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """The config.json of a checkpoint directory (plus generation_config.json's EOS ids).
        ModelNotFoundError when there is no such directory, FileNotFoundError when it has no
        config.json, ModelConfigError (naming the file) when the file is unusable."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelNotFoundError(f"model directory {str(model_dir)!r} does not exist")
        path = model_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}: expected a Hugging Face checkpoint directory")
        hf = read_json(path)
        try:
            cfg = cls.from_hf_dict(hf)
        except (ValueError, TypeError, ZeroDivisionError) as e:  # a field of the wrong type or value
            raise ModelConfigError(f"{path}: {e}") from None
        # generation_config.json may list more EOS ids (Llama 3 instruct: three); all end generation.
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = read_json(gen).get("eos_token_id")
            extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
            merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
            cfg = dataclasses.replace(cfg, eos_token_ids=merged)
        return cfg

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in _FAMILIES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or '(none given)'} in architectures; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [k for k in REQUIRED_FIELDS if hf.get(k) is None]
        if missing:
            raise ValueError(f"missing required field(s) {', '.join(missing)}")
        family = _FAMILIES[arch]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is supported")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        num_layers = hf["num_hidden_layers"]
        rope_theta, scaling = _parse_rope(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2-MoE names the switch (transformers 5 writes it); older configs mean True.
            qkv_bias=(bool(hf.get("qkv_bias", True)) if arch == "Qwen2MoeForCausalLM" else family.get("qkv_bias", False))
            or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family.get("qk_norm", False),
            sliding_windows=_parse_sliding_windows(hf, arch, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            moe=_parse_moe(hf, arch, num_layers) if family.get("moe") else None,
        )


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object file; ModelConfigError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"{path} is not a JSON text file ({e}); the checkpoint is corrupt") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(value, dict):
        raise ModelConfigError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = dict(hf.get("rope_scaling") or {}) or params
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in scaling.items() if k in fields and v is not None}
    kwargs["rope_type"] = rope_type
    return float(theta), RopeScaling(**kwargs)


def _parse_moe(hf: dict[str, Any], arch: str, num_layers: int) -> MoeConfig | None:
    # Qwen3-MoE's Hub configs say num_experts; transformers 5 writes num_local_experts (Mixtral's name).
    num_experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not num_experts:
        if arch == "MixtralForCausalLM":
            raise ValueError("missing required field num_local_experts")
        return None  # Qwen with num_experts 0: every layer dense
    if arch == "MixtralForCausalLM":  # every layer sparse; the chosen weights always renormalised
        return MoeConfig(num_experts, hf.get("num_experts_per_tok", 2), hf["intermediate_size"], norm_topk_prob=True)
    for key in ("moe_intermediate_size", "num_experts_per_tok"):
        if hf.get(key) is None:
            raise ValueError(f"missing required field {key}")
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step") or 1
    return MoeConfig(
        num_experts, hf["num_experts_per_tok"], hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=(hf.get("shared_expert_intermediate_size") or 0)
        if arch == "Qwen2MoeForCausalLM" else 0,
        sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _parse_sliding_windows(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window") or None  # Qwen2-MoE writes 0 for none
    layer_types = hf.get("layer_types")
    if layer_types:  # transformers >= 4.53 spells it out per layer
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None:
        return (None,) * num_layers
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return (window,) * num_layers
    if not hf.get("use_sliding_window", False):
        return (None,) * num_layers
    if arch == "Qwen3MoeForCausalLM":  # transformers masks every layer
        return (window,) * num_layers
    if arch == "Qwen2MoeForCausalLM":  # transformers 5's default layer_types: even layers below max_window_layers
        first = hf.get("max_window_layers", 28)
        return tuple(window if i % 2 == 0 and i < first else None for i in range(num_layers))
    # Qwen2/3: only with use_sliding_window, and only from layer max_window_layers on.
    first = hf.get("max_window_layers", num_layers)
    return tuple(window if i >= first else None for i in range(num_layers))
