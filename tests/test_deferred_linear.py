"""A branch's last linear left to the next norm (ops.DeferredLinear, what QUAD_GEMV_NORM=1 does on
a GPU at 1-4 tokens): every consumer of a layer's output (the norms, the final norm and both heads,
the engine's last-row selection) gives exactly what the computed tensor gives. On the CPU the norm
computes the deferred linear itself, so the logits must be bit-identical."""

import torch

from quad_engine import ops
from quad_engine.synthetic import synthetic_model


def defer_everything(monkeypatch):
    monkeypatch.setattr(ops, "branch_output",
                        lambda w, q, s: w(q, s) if s is None else ops.DeferredLinear(w, q, s))


def test_model_logits_unchanged(monkeypatch):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))

    def outputs():  # the float16 head's logits, then the int8 head's and the final hidden states
        model = synthetic_model("smollm2-135m", num_layers=2, vocab_size=512, mode="w4a4a8", seed=4).eval()
        with torch.no_grad():
            f16 = model(ids)
            model.use_int8_head()
            return f16, model(ids), model.hidden(ids), model.residual(ids)[1]

    *want, pending = outputs()
    assert isinstance(pending, torch.Tensor)
    defer_everything(monkeypatch)
    *got, pending = outputs()
    assert isinstance(pending, ops.DeferredLinear)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_engine_tokens_unchanged(monkeypatch):
    from quad_engine.engine import LLM
    from quad_engine.sampling import SamplingParams
    torch.manual_seed(1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    runs = []
    for deferred in (False, True):
        if deferred:
            defer_everything(monkeypatch)
        model = synthetic_model("smollm2-135m", num_layers=1, vocab_size=512, mode="w4a4a8", seed=3)
        llm = LLM(model=model, device="cpu", num_blocks=16, max_model_len=64)
        runs.append([out.token_ids for out in llm.generate(prompts, params)[0]])
    assert runs[0] == runs[1]
