"""`quad_config.json`: everything needed to run a packed checkpoint, read back as a dataclass.

The engine never guesses a setting from a file name or from tensor shapes: what the converter
decided is written here, and the loader validates the tensors against it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FORMAT_VERSION = 1
CONFIG_NAME = "quad_config.json"

# Which activation bits each quantized linear's input uses, per mode. "w16a16" is the unquantized
# transformed model (fp weights, no activation or KV quantization): the invariance check and a debug aid.
MODES = {
    "w4a4": {"qkv": 4, "o": 4, "gate_up": 4, "down": 4},
    "w4a4a8": {"qkv": 4, "o": 8, "gate_up": 4, "down": 8},
    "w16a16": {"qkv": 16, "o": 16, "gate_up": 16, "down": 16},
}


class ConfigError(ValueError):
    """A quad_config.json that this version cannot run; str() is one line for the user."""


@dataclass
class HadamardSpec:
    """An online (run-time) Hadamard transform over the last `size` channels of an activation.

    factors: Kronecker factors of one block (their product is the block size). block: None when one
    exact Hadamard spans the whole size; else the block size of a block-diagonal fallback used
    because no exact Hadamard of `size` is known.
    """
    size: int
    factors: list[int]
    block: int | None = None


@dataclass
class QuadConfig:
    architecture: str                 # "llama" | "qwen2"
    hidden_size: int                  # d, the original model width
    rank: int                         # r, fp16 outlier channels; residual stream is r + d wide
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    attention_bias: bool              # q/k/v bias (Qwen2)
    rope_attention_scaling: float     # multiplies cos/sin (1.0 except for some rope_scaling types)
    mode: str                         # key of MODES
    weight_bits: int = 4
    group_size: int = -1              # -1: one weight scale per output row
    act_clip: float = 0.9             # per-token activation clip ratio
    kv_bits: int = 4                  # 4 or 16
    kv_clip: float = 1.0
    hadamard_o: HadamardSpec | None = None      # o_proj input, across heads (or the whole width)
    hadamard_down: HadamardSpec | None = None   # down_proj input, the intermediate size
    hadamard_head: HadamardSpec | None = None   # Q and K after RoPE, over head_dim
    residual_rotation: dict = field(default_factory=dict)  # how the offline rotation was built (seeds, kinds)
    weight_quant: dict = field(default_factory=dict)       # method, mse_clip, act_order, damping...
    calibration: dict = field(default_factory=dict)        # text, nsamples, seqlen, seed
    source: dict = field(default_factory=dict)             # description + fingerprint of the source model
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str = "float16"            # dtype of the fp tensors (embedding, lm_head, outlier weights, biases)
    format_version: int = FORMAT_VERSION

    @property
    def width(self) -> int:
        """Width of the residual stream: r fp16 outlier channels followed by d quantized channels."""
        return self.rank + self.hidden_size

    @property
    def act_bits(self) -> dict[str, int]:
        return MODES[self.mode]

    @property
    def quantized(self) -> bool:
        return self.mode != "w16a16"

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"checkpoint format version {self.format_version} is not supported "
                              f"(this quad-engine reads version {FORMAT_VERSION}); re-convert the model")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; expected one of {sorted(MODES)}")
        if self.architecture not in ("llama", "qwen2"):
            raise ConfigError(f"unknown architecture {self.architecture!r}; expected llama or qwen2")
        if self.kv_bits not in (4, 16):
            raise ConfigError(f"kv_bits must be 4 or 16, got {self.kv_bits}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads must be a multiple of num_kv_heads")

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "QuadConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{directory} is not a quad checkpoint (no {CONFIG_NAME})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"checkpoint format version {version} is not supported "
                              f"(this quad-engine reads version {FORMAT_VERSION}); re-convert the model")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path} has unknown fields {unknown}")
        for key in ("hadamard_o", "hadamard_down", "hadamard_head"):
            if raw.get(key) is not None:
                raw[key] = HadamardSpec(**raw[key])
        try:
            cfg = cls(**raw)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None
        cfg.validate()
        return cfg
