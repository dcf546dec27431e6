"""The conversion pipeline: source model -> packed QUAD checkpoint, one decoder layer at a time.

Pass 1 runs the original model layer by layer over the calibration tokens and accumulates the
residual stream's XᵀX at every RMSNorm input; its top-r eigenvectors give P (skipped when r = 0).
Pass 2 transforms each layer (norm fusion, Q = [P, I - PPᵀ], rotations, fused Hadamards), quantizes
its linears sequentially (qkv, o, gate_up, down) with GPTQ on inputs produced by the already
quantized layers before it, writes them, and moves the calibration activations on.
Only one layer's weights and the calibration activations are in memory at any time.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from converter import gptq
from converter.rotate import (online_spec, projection_from_covariance, quad_q, residual_rotation,
                              transform_layer)
from converter.sources import ModelSource, open_source
from converter.write import CheckpointWriter, check_output_dir
from kernels_tl import reference as ref
from quad_engine.config import MODES, QuadConfig
from quad_engine.models.llama import DecoderLayer, rope_cos_sin

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
READERS = ("qkv", "gate_up")          # read the residual stream: fp16 outlier slice + quantized part
SEQUENTIAL_GROUPS = ("qkv", "o", "gate_up", "down")


@dataclass
class ConvertOptions:
    rank: int = 64
    mode: str = "w4a4a8"
    kv_bits: int = 4
    weight_quant: str = "gptq"          # gptq | rtn
    group_size: int = -1
    act_clip: float = 0.9
    kv_clip: float = 1.0
    rotation: str = "hadamard"          # hadamard | none (plain RTN/GPTQ baseline, no rotations)
    calib: str | None = None            # text file or dataset name; None: the bundled prose excerpt
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    act_order: bool = True
    mse_clip: bool = True
    percdamp: float = 0.01
    device: str = "cpu"
    dtype: str = "float16"
    force: bool = False
    batch_size: int = 4                  # calibration sequences per forward chunk


def _layer_weights(src: ModelSource, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    names = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight", "ln1": "input_layernorm.weight",
             "ln2": "post_attention_layernorm.weight"}
    w = {k: src.tensor(p + v) for k, v in names.items()}
    for b in ("q", "k", "v"):
        if src.has(f"{p}self_attn.{b}_proj.bias"):
            w[f"{b}_bias"] = src.tensor(f"{p}self_attn.{b}_proj.bias")
    return w


def _model_tensors(i: int, t: dict[str, torch.Tensor], rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Transformed float weights in the checkpoint's unquantized (w16a16) naming."""
    out = {}
    for name in SEQUENTIAL_GROUPS:
        w = t[name].to(dtype)
        if name in READERS:
            out[f"layers.{i}.{name}.weight"] = w[:, rank:].contiguous()
            if rank > 0:
                out[f"layers.{i}.{name}.w_out"] = w[:, :rank].contiguous()
        else:
            out[f"layers.{i}.{name}.weight"] = w.contiguous()
    if "qkv_bias" in t:
        out[f"layers.{i}.qkv.bias"] = t["qkv_bias"].to(dtype)
    return out


def _rope(source: ModelSource) -> tuple[torch.Tensor, float]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rotary = LlamaRotaryEmbedding(source.config)
    return rotary.inv_freq.float(), float(rotary.attention_scaling)


def _cos_sin(inv_freq: torch.Tensor, scale: float, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(inv_freq, torch.arange(seqlen, device=device).unsqueeze(0), scale)


def _chunks(h: torch.Tensor, size: int):
    for start in range(0, h.shape[0], size):
        yield slice(start, start + size)


def build_config(source: ModelSource, opts: ConvertOptions) -> QuadConfig:
    hf = source.config
    arch_name = (getattr(hf, "architectures", None) or ["?"])[0]
    nh = hf.num_attention_heads
    hd = getattr(hf, "head_dim", None) or hf.hidden_size // nh
    rotate = opts.rotation == "hadamard"
    _, attention_scaling = _rope(source)
    eos = getattr(hf, "eos_token_id", None)
    return QuadConfig(
        architecture=ARCHITECTURES[arch_name], hidden_size=hf.hidden_size, rank=opts.rank,
        num_layers=hf.num_hidden_layers, num_heads=nh, num_kv_heads=hf.num_key_value_heads, head_dim=hd,
        intermediate_size=hf.intermediate_size, vocab_size=hf.vocab_size, rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        attention_bias=source.has("model.layers.0.self_attn.q_proj.bias"),
        rope_attention_scaling=attention_scaling, mode=opts.mode,
        weight_bits=4 if opts.mode != "w16a16" else 16, group_size=opts.group_size, act_clip=opts.act_clip,
        kv_bits=opts.kv_bits, kv_clip=opts.kv_clip,
        hadamard_head=online_spec(hd, "head_dim") if rotate else None,
        hadamard_o=online_spec(nh * hd, "o_proj input") if rotate else None,
        hadamard_down=online_spec(hf.intermediate_size, "down_proj input") if rotate else None,
        bos_token_id=getattr(hf, "bos_token_id", None), eos_token_id=eos, dtype=opts.dtype,
        source={"description": source.description, "fingerprint": source.fingerprint,
                "architecture": arch_name},
    )


def residual_covariance(source: ModelSource, cfg: QuadConfig, tokens: torch.Tensor, opts: ConvertOptions,
                        progress: bool = True) -> torch.Tensor:
    """Pass 1: XᵀX (float64, d x d) of the original model's residual stream at every RMSNorm input."""
    device = torch.device(opts.device)
    plain = dataclasses.replace(cfg, rank=0, mode="w16a16", kv_bits=16, hadamard_head=None,
                                hadamard_o=None, hadamard_down=None)
    inv_freq, scale = _rope(source)
    cos, sin = _cos_sin(inv_freq, scale, tokens.shape[1], device)
    h = source.tensor("model.embed_tokens.weight").to(device)[tokens.to(device)].float()
    xtx = gptq.HessianAccumulator(cfg.hidden_size, device=device)  # Σ xᵀx in float64
    accumulate = xtx.add

    for i in tqdm(range(cfg.num_layers), desc="calibrating P", disable=not progress, file=sys.stderr):
        t = transform_layer(_layer_weights(source, i), None, cfg.num_heads, cfg.num_kv_heads, None, None, None)
        layer = DecoderLayer(plain, _model_tensors(i, t, 0, torch.float32), i).to(device)
        for s in _chunks(h, opts.batch_size):
            x = h[s]
            accumulate(x)
            mid = x + layer.attn(x, None, cos, sin)
            accumulate(mid)
            h[s] = mid + layer.mlp(mid, None)
        del layer, t
    accumulate(h)
    return xtx.sum


def _rows_times(w: torch.Tensor, m: torch.Tensor, dtype: torch.dtype, rows: int = 8192) -> torch.Tensor:
    """(w @ m) in float64, a slice of rows at a time: a 128k-vocab embedding in float64 is 4 GB."""
    return torch.cat([(w[i:i + rows].double() @ m).to(dtype) for i in range(0, w.shape[0], rows)])


def _quantize(w: torch.Tensor, hessian: torch.Tensor | None, opts: ConvertOptions):
    if opts.weight_quant == "rtn":
        return gptq.quantize_rtn(w, bits=4, group_size=opts.group_size, mse_clip=opts.mse_clip), None
    return gptq.quantize_gptq(w, hessian, bits=4, group_size=opts.group_size, percdamp=opts.percdamp,
                              act_order=opts.act_order, mse_clip=opts.mse_clip)


def _relative_output_error(x_hessian: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖X(Ŵ - W)ᵀ‖² / ‖XWᵀ‖² from the Hessian alone (tr(ΔHΔᵀ) / tr(WHWᵀ))."""
    delta = (w_hat - w).float()
    num = torch.einsum("nk,kl,nl->", delta, x_hessian, delta)
    den = torch.einsum("nk,kl,nl->", w.float(), x_hessian, w.float())
    return float(num / den.clamp_min(1e-30))


def convert(src: str | ModelSource, out_dir: str | Path, opts: ConvertOptions,
            calib_tokens: torch.Tensor | None = None, progress: bool = True) -> Path:
    """Convert SRC into a packed checkpoint at OUT_DIR (atomically). Returns OUT_DIR."""
    if opts.mode not in MODES:
        raise ValueError(f"unknown mode {opts.mode!r}; expected one of {sorted(MODES)}")
    check_output_dir(out_dir, opts.force)
    started = time.time()
    source = open_source(src) if isinstance(src, str) else src
    cfg = build_config(source, opts)
    writer = CheckpointWriter(out_dir)
    try:
        log = _convert_into(writer, source, cfg, opts, calib_tokens, progress)
        log.update(seconds=round(time.time() - started, 1), peak_rss_gb=round(peak_rss_gb(), 3))
        (writer.path / "conversion_log.json").write_text(json.dumps(log, indent=1) + "\n")
        return writer.commit(force=opts.force)
    except BaseException:
        writer.abort()
        raise


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2   # ru_maxrss is in KiB on Linux


def _calibration_tokens(writer: CheckpointWriter, opts: ConvertOptions, cfg: QuadConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    from quad_engine.data import DEMO_CALIB_TEXT, calibration_batches
    tokenizer = AutoTokenizer.from_pretrained(str(writer.path))
    spec = opts.calib or str(DEMO_CALIB_TEXT)
    cfg.calibration = {"text": Path(spec).name if Path(spec).exists() else spec, "nsamples": opts.nsamples,
                       "seqlen": opts.seqlen, "seed": opts.seed}
    return calibration_batches(tokenizer, spec, opts.nsamples, opts.seqlen, opts.seed)


def _convert_into(writer: CheckpointWriter, source: ModelSource, cfg: QuadConfig, opts: ConvertOptions,
                  calib_tokens: torch.Tensor | None, progress: bool) -> dict:
    device = torch.device(opts.device)
    source.save_tokenizer(str(writer.path))
    needs_calibration = opts.rank > 0 or (cfg.quantized and opts.weight_quant == "gptq")
    tokens = None
    if needs_calibration:
        tokens = calib_tokens if calib_tokens is not None else _calibration_tokens(writer, opts, cfg)
        if calib_tokens is not None:
            cfg.calibration = {"text": "tokens given by the caller", "nsamples": int(tokens.shape[0]),
                               "seqlen": int(tokens.shape[1])}
    torch.manual_seed(opts.seed)

    # ---- the residual transform M = Q R (d x D)
    d, r = cfg.hidden_size, cfg.rank
    m = torch.eye(d, dtype=torch.float64, device=device)
    if r > 0:
        xtx = residual_covariance(source, cfg, tokens, opts, progress)
        m = quad_q(projection_from_covariance(xtx, r))
    if opts.rotation == "hadamard":
        rot, cfg.residual_rotation = residual_rotation(d, r, opts.seed, device)
        m = m @ rot
    else:
        cfg.residual_rotation = {"kind": "none"}

    fp = getattr(torch, opts.dtype)
    embed = source.tensor("model.embed_tokens.weight").to(device)
    writer.add("embed.weight", _rows_times(embed, m, fp))
    lm_name = "lm_head.weight" if source.has("lm_head.weight") else "model.embed_tokens.weight"
    lm_head = source.tensor(lm_name).to(device) * source.tensor("model.norm.weight").to(device)
    writer.add("lm_head.weight", _rows_times(lm_head, m, fp))
    inv_freq, scale = _rope(source)
    writer.add("rope.inv_freq", inv_freq)
    del lm_head

    h = cos = sin = None
    if cfg.quantized and opts.weight_quant == "gptq":
        h = (embed.double()[tokens.to(device)] @ m).float()
        cos, sin = _cos_sin(inv_freq, scale, tokens.shape[1], device)
    del embed

    calib_cfg = dataclasses.replace(cfg, mode="w16a16", kv_bits=16, dtype="float32")
    layer_logs = []
    bar = tqdm(range(cfg.num_layers), desc="quantizing layers", disable=not progress, file=sys.stderr)
    for i in bar:
        t = transform_layer({k: v.to(device) for k, v in _layer_weights(source, i).items()}, m,
                            cfg.num_heads, cfg.num_kv_heads, cfg.hadamard_head, cfg.hadamard_o, cfg.hadamard_down)
        tensors = _model_tensors(i, t, r, torch.float32)
        del t
        if not cfg.quantized:
            for name, value in tensors.items():
                writer.add(name, value.to(fp))
            continue
        layer = DecoderLayer(calib_cfg, tensors, i).to(device)
        modules = {"qkv": layer.attn.qkv, "o": layer.attn.o, "gate_up": layer.mlp.gate_up, "down": layer.mlp.down}
        entry = {"layer": i}
        for name in SEQUENTIAL_GROUPS:
            module = modules[name]
            w = module.weight
            hessian = None
            if h is not None:
                hessian = _collect_hessian(layer, module, h, cos, sin, opts.batch_size)
            qw, _ = _quantize(w, hessian, opts)
            w_hat = qw.dequantize().to(w.device)
            if hessian is not None:
                entry[name] = _relative_output_error(hessian, w, w_hat)
            module.weight = w_hat  # later groups calibrate on this group's quantized output
            writer.add(f"layers.{i}.{name}.qweight", ref.pack_int4(qw.q.cpu()))
            writer.add(f"layers.{i}.{name}.wscale", qw.scale.cpu())
            for extra in ("w_out", "bias"):
                if f"layers.{i}.{name}.{extra}" in tensors:
                    writer.add(f"layers.{i}.{name}.{extra}", tensors[f"layers.{i}.{name}.{extra}"].to(fp))
        if h is not None:
            with torch.no_grad():
                for s in _chunks(h, opts.batch_size):
                    h[s] = layer.step(h[s], cos, sin)
        layer_logs.append(entry)
        if len(entry) > 1:
            bar.set_postfix({k: f"{v:.2e}" for k, v in entry.items() if k != "layer"})
        del layer, tensors

    cfg.weight_quant = {"method": opts.weight_quant if cfg.quantized else "none", "bits": cfg.weight_bits,
                        "group_size": opts.group_size, "act_order": opts.act_order, "mse_clip": opts.mse_clip,
                        "percdamp": opts.percdamp, "symmetric": True}
    cfg.save(writer.path)
    return {"options": dataclasses.asdict(opts), "relative_output_error": layer_logs}


def _collect_hessian(layer: DecoderLayer, module: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Run the layer over the calibration activations and accumulate this linear's input Hessian."""
    acc = gptq.HessianAccumulator(module.weight.shape[1], device=h.device)
    handle = module.register_forward_pre_hook(lambda _m, args: acc.add(args[0]))
    try:
        with torch.no_grad():
            for s in _chunks(h, batch_size):
                layer.step(h[s], cos, sin)
    finally:
        handle.remove()
    return acc.hessian
