"""int8 embedding and lm_head tables (QuadForCausalLM.use_int8_head): the row quantizer, the W8A8
head against the float16 head it replaces, and the engine running with them (CPU reference)."""

import torch

from kernels_tl import reference as ref
from quad_engine.synthetic import synthetic_model


def test_int8_rows_round_each_row_to_its_own_scale():
    w = torch.randn(6, 40) * torch.tensor([1e-3, 1.0, 50.0, 0.0, 3.0, 7.0]).unsqueeze(1)
    q, s = ref.quantize_rows_int8(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert s[3] == 1 and not q[3].any()                       # an all-zero row
    assert (q.abs().amax(1)[[0, 1, 2, 4, 5]] == 127).all()    # every other row uses the full range
    err = (q.float() * s.unsqueeze(1) - w).abs()
    assert (err <= s.unsqueeze(1) / 2 + 1e-7).all()           # within half a step


def test_w8a8_head_integer_part_is_exact():
    """x_q · head_qᵀ is summed exactly (float64), however large: compare against int64."""
    torch.manual_seed(0)
    r, d, v = 8, 4096, 16
    hidden = torch.randn(3, r + d)
    head_q = torch.full((v, d), 127, dtype=torch.int8)
    head_s = torch.ones(v)
    head_out = torch.zeros(v, r, dtype=torch.float16)
    q, sx = ref.quantize_act(hidden[:, r:], 8, 1.0)
    logits = ref.head_w8a8(hidden[:, :r].half(), q, sx, head_out, head_q, head_s)
    exact = (q.long() @ head_q.long().T).double() * sx.double()
    assert torch.allclose(logits.double(), exact, rtol=1e-6)


def test_int8_tables_follow_the_float16_tables():
    """On the same input, the int8 head's logits and the int8 embedding's rows stay within int8
    rounding of the float16 tables. (Whole-model logits are not compared: a W4A4 model turns any
    input difference into quantizer flips, docs/results.md.)"""
    torch.manual_seed(1)
    model = synthetic_model("smollm2-135m", num_layers=1, vocab_size=512, mode="w4a4a8").eval()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        h, pending = model.residual(ids)
        want_logits, want_rows = model.head_logits(h.clone(), pending), model.embed[ids].float()
        model.use_int8_head()
        got_logits = model.head_logits(h.clone(), pending)
        got_rows = model.embed[ids].float() * model.embed_scale[ids].unsqueeze(-1)
    assert model.lm_head is None and model.embed.dtype == torch.int8 and model.head_q.dtype == torch.int8
    rel = float((got_logits - want_logits).norm() / want_logits.norm())
    assert rel < 2e-2, rel  # ~1%: per-token int8 activations and per-row int8 weights
    assert float((got_rows - want_rows).norm() / want_rows.norm()) < 1e-2


def test_engine_generates_with_the_int8_head(tmp_path):
    from quad_engine.engine import LLM
    from quad_engine.sampling import SamplingParams
    model = synthetic_model("smollm2-135m", num_layers=1, vocab_size=512, mode="w4a4a8")
    llm = LLM(model=model, device="cpu", num_blocks=16, max_model_len=128, int8_head=True)
    assert llm.model.head_int8
    outputs, _ = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(outputs[0].token_ids) == 4


def test_int8_head_takes_the_final_norm_split():
    """The int8 head's logits are reference.head_w8a8 of the final norm's split: float16(h + pending)
    normalized, the outlier channels as float16, the rest int8 per token (clip 1); and the residual
    is left as h + pending, as the float16 head leaves it."""
    torch.manual_seed(2)
    model = synthetic_model("smollm2-135m", num_layers=1, vocab_size=512, mode="w4a4a8").eval()
    model.use_int8_head()
    cfg, ids = model.cfg, torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        h, pending = model.residual(ids)
        assert pending is not None and pending.dtype == torch.float16
        got = model.head_logits(h_after := h.clone(), pending)
    h_sum = h + pending.float()
    x_out, x_q, x_s = ref.rmsnorm_split_quant(h_sum.half().float(), cfg.rank, cfg.hidden_size, cfg.rms_norm_eps, 8, 1.0)
    want = ref.head_w8a8(x_out.half(), x_q, x_s, model.head_out, model.head_q, model.head_scale)
    assert torch.equal(h_after, h_sum)
    assert torch.equal(got, want)
