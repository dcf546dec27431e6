"""Engine on the reference backend (CPU): paged-cache generation equals full recompute, preemption
is invisible in the output, blocks never leak, sampling behaves."""

import random

import pytest
import torch

from converter.pipeline import ConvertOptions, convert
from quad_engine.block_manager import BlockManager
from quad_engine.checkpoint import load_model
from quad_engine.engine import LLM
from quad_engine.sampling import Sampler, SamplingParams, find_stop
from quad_engine.scheduler import Scheduler, Sequence
from tiny import save_tiny

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [120, 8], list(range(30, 59))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    src = save_tiny(root / "src", "llama")
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    opts = ConvertOptions(rank=8, mode="w4a4a8", kv_bits=4, nsamples=8, seqlen=64)
    return convert(str(src), root / "quad", opts, calib_tokens=calib, progress=False)


def reference_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_greedy_tokens_equal_a_full_recompute_loop(checkpoint):
    llm = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=128)
    outputs, stats = llm.generate(PROMPTS, GREEDY)
    model = load_model(checkpoint)
    model.use_int8_head()  # the engine's default tables
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == reference_greedy(model, prompt, 12)
        assert out.finish_reason == "length"
    assert stats.prefill_tokens == sum(map(len, PROMPTS)) and stats.decode_tokens == 3 * 11
    assert llm.block_manager.num_free_blocks == 64  # every block came back


def test_preemption_and_resume_do_not_change_greedy_output(checkpoint):
    roomy = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=48)
    tight = LLM(checkpoint, device="cpu", num_blocks=12, block_size=4, max_model_len=48)
    want, _ = roomy.generate(PROMPTS, GREEDY)
    got, stats = tight.generate(PROMPTS, GREEDY)
    assert stats.preemptions >= 1
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert tight.block_manager.num_free_blocks == 12


def test_prompts_that_cannot_run_are_rejected_at_submission(checkpoint):
    llm = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="context of 32 tokens"):
        llm.generate([list(range(40))], GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], GREEDY)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(checkpoint):
    llm = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=64)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    alone, _ = llm.generate([PROMPTS[0]], p)
    batched, _ = llm.generate(PROMPTS, [p, SamplingParams(temperature=1.0, seed=1, max_tokens=5), GREEDY])
    assert alone[0].token_ids == batched[0].token_ids


# ---------------------------------------------------------------- blocks and scheduler

def test_block_manager_slots_follow_non_contiguous_tables_and_free_everything():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 3)
    bm.allocate(1, 6)
    bm.free(0)
    bm.allocate(2, 9)  # reuses block 0 after blocks 3.. : a non-contiguous table
    table = bm.block_table(2)
    assert bm.slot_mapping(2, 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.allocator.free(table[0]) or bm.allocator.free(table[0])


def test_no_block_leaks_after_a_thousand_random_requests():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=60, eos_token_id=0)
    for i in range(1000):
        n = rng.randint(1, 40)
        sched.add(Sequence(i, [rng.randint(1, 9) for _ in range(n)], SamplingParams(max_tokens=rng.randint(1, 30))))
    while sched.has_unfinished():
        batch, _ = sched.schedule()
        owned = [b for seq in sched.running for b in bm.block_table(seq.seq_id)]
        assert len(owned) == len(set(owned))  # no block is shared by two live sequences
        sched.postprocess(batch, [rng.choice([0] + [5] * 20) for _ in batch])
    assert bm.num_free_blocks == 64 and not any(bm.allocator.refcount) and not bm.tables


def test_sampler_greedy_top_k_and_top_p_reduce_to_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler()
    argmax = logits.argmax(-1)
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=1),
              SamplingParams(temperature=1.0, top_p=1e-6)):
        assert torch.equal(sampler.sample(logits, [p] * 4), argmax)


def test_sampler_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = Sampler().sample(logits, [SamplingParams(temperature=1.0)] * 4000, [gen] * 4000)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.03


@pytest.mark.parametrize("kwargs,field", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                          ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens")])
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_find_stop():
    assert find_stop("hello world. Bye", [".", "Bye"]) == 11
    assert find_stop("hello", ["x"]) is None


def test_fp16_baseline_engine_matches_transformers_greedy(tmp_path):
    """The unquantized path (HF weights, paged float cache) under the same scheduler equals
    transformers' own greedy generation."""
    from tiny import tiny_model
    src = save_tiny(tmp_path / "src", "qwen2", intermediate=96)
    hf = tiny_model("qwen2", intermediate=96)
    llm = LLM(src, device="cpu", num_blocks=64, block_size=4, max_model_len=128, fp16=True)
    outputs, _ = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):]
        assert out.token_ids == want.tolist()


def test_synthetic_models_follow_the_checkpoint_schema_and_run_in_the_engine():
    from quad_engine.checkpoint import validate_tensors
    from quad_engine.synthetic import ARCHITECTURES, synthetic_config, synthetic_model, synthetic_tensors
    for name in ARCHITECTURES:
        cfg = synthetic_config(name, num_layers=1)
        assert cfg.hadamard_down.size == cfg.intermediate_size
    cfg = synthetic_config("smollm2-135m", num_layers=2, vocab_size=512)
    validate_tensors(cfg, synthetic_tensors(cfg))  # names, shapes and dtypes of a converted checkpoint
    model = synthetic_model("smollm2-135m", num_layers=2, vocab_size=512)
    llm = LLM(model=model, device="cpu", num_blocks=16, block_size=16, max_model_len=128)
    rows = []
    llm.logits_hook = lambda seqs, logits: rows.extend(
        row.float().clone() for seq, row in zip(seqs, logits) if list(seq.token_ids[:3]) == [1, 2, 3])
    outputs, _ = llm.generate([[1, 2, 3], [4] * 20], GREEDY)
    assert outputs[0].text == "" and len(rows) == 12
    # Teacher-forced against a full recompute of the same tokens. The two sum the float outlier
    # products and attention in different orders (other row counts), and a random model's
    # activation quantizers turn such differences into an occasional whole-step flip (~1% of the
    # logits), so tokens are compared where the recompute's top-2 margin is clear of that.
    ids = [1, 2, 3] + outputs[0].token_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids[:-1]]))[0, 2:]
    got = torch.stack(rows)
    assert got.argmax(-1).tolist() == outputs[0].token_ids
    err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.median() < 1e-4 and err.max() < 5e-2, err.tolist()
    top2 = ref.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.1
    assert clear.sum() >= 6 and (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_stop_strings_and_streaming_see_the_same_text(checkpoint):
    llm = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=128)
    plain, _ = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = plain[0].text
    assert text, "the tiny model generated no text"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    pieces = []
    cut, _ = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                                stop=[stop]), on_token=lambda i, d: pieces.append(d))
    assert cut[0].text == text[:text.find(stop)] and cut[0].finish_reason == "stop"
    assert "".join(pieces) == cut[0].text or text.find(stop) == 0


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rope_and_head_hadamard_as_one_matrix_per_token_equal_the_two_steps(head_dim):
    """The small-step path (one matmul with per-token matrices) against RoPE then the Hadamard."""
    from quad_engine import ops
    from quad_engine.models.llama import apply_rope, rope_cos_sin, rope_hadamard_matrices
    from quad_engine.synthetic import _online

    spec = _online(head_dim)
    inv_freq = 1.0 / 500000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = rope_cos_sin(inv_freq, torch.tensor([[0, 1, 5, 100, 4095, 8191]]), 1.0)
    x = torch.randn(1, 6, 3, head_dim)
    want = ops.hadamard(apply_rope(x.transpose(1, 2), cos, sin), spec).transpose(1, 2)
    got = ops.rope_hadamard(x, rope_hadamard_matrices(cos, sin, spec, chunk=4))  # two chunks
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_step_hook_marks_every_prefill_step_of_a_chunked_batch(checkpoint):
    """A batch longer than max_num_batched_tokens prefills in several steps; the bench counts decode
    time and memory only after the last of them, so the hook must say which steps prefilled."""
    llm = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=64, max_num_batched_tokens=24)
    steps = []
    llm.step_hook = lambda dt, is_prefill: steps.append(is_prefill)
    llm.generate([[1 + i] * 20 for i in range(3)], SamplingParams(temperature=0, ignore_eos=True, max_tokens=5))
    first_decode = steps.index(False)
    assert first_decode == 3 and not any(steps[first_decode:])  # one prompt a step, then decode only
    assert len(steps) - first_decode == 4  # max_tokens 5: the prefill gives the first token


def test_a_prompt_longer_than_the_token_budget_prefills_in_chunks(checkpoint):
    """Chunks attend to the ones before them through the paged int4 cache: the greedy tokens equal
    an unchunked engine's and a full recompute's, seeded sampling draws the same tokens, and every
    block comes back."""
    prompts = [list(range(30, 59)), [5, 17, 99]]  # 29 tokens: chunks of 8; and a short one
    whole = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=64)
    chunked = LLM(checkpoint, device="cpu", num_blocks=64, block_size=4, max_model_len=64, max_num_batched_tokens=8)
    steps = []
    chunked.step_hook = lambda dt, is_prefill: steps.append(is_prefill)
    want, _ = whole.generate(prompts, GREEDY)
    got, stats = chunked.generate(prompts, GREEDY)
    assert steps[:4] == [True] * 4 and stats.prefill_tokens == 32
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    model = load_model(checkpoint)
    model.use_int8_head()
    assert got[0].token_ids == reference_greedy(model, prompts[0], 12)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, seed=7, ignore_eos=True)
    assert ([o.token_ids for o in chunked.generate(prompts, seeded)[0]]
            == [o.token_ids for o in whole.generate(prompts, seeded)[0]])
    assert chunked.block_manager.num_free_blocks == 64


def test_rope_table_rows_equal_the_computed_cos_sin():
    """The engine's precomputed cos / sin (gathered by position) are bit for bit what rope_cos_sin
    computes for those positions: the engine's steps and a full recompute rotate identically."""
    from quad_engine.models.llama import rope_cos_sin, rope_table
    inv_freq = 1.0 / 500000 ** (torch.arange(0, 128, 2).float() / 128)
    table = rope_table(inv_freq, 8192, 1.25)
    positions = torch.tensor([[0, 1, 7, 1000, 4095, 8191]])
    cos, sin = rope_cos_sin(inv_freq, positions, 1.25)
    got_cos, got_sin = table[:, positions]
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    assert got_cos.is_contiguous() and got_cos.shape == (1, 6, 128)


def test_decode_inputs_pack_each_row_and_pad_the_bucket():
    """A decode step's packed inputs (filled in place into a reused buffer): the last token, its
    position and cache slot, the context length and the block table of each sequence, then padding
    rows that store nothing (slot -1); a smaller batch in the same buffer leaves nothing behind."""
    from quad_engine.synthetic import synthetic_model
    llm = LLM(model=synthetic_model("smollm2-135m", num_layers=1, vocab_size=512, mode="w4a4a8"), device="cpu",
              num_blocks=64, max_model_len=300)
    bm, bs, width = llm.block_manager, llm.block_manager.block_size, llm._table_width
    seqs = [Sequence(i, list(range(1, n + 1)), SamplingParams()) for i, n in enumerate((70, 3, 130))]
    bm.allocate(99, 2 * bs)  # other blocks taken first: the tables are not 0, 1, 2, ...
    for seq in seqs:
        bm.allocate(seq.seq_id, seq.num_tokens)
    seqs[1].output_token_ids.append(7)  # a sequence that has generated: its last token is the output
    bm.append_slot(1, seqs[1].num_tokens)
    for n in (3, 1):
        ids, positions, slots, lens, tables = llm._views(llm._decode_inputs(seqs[:n], 4, width), 4)
        for i, seq in enumerate(seqs[:n]):
            t = seq.num_tokens
            table = bm.block_table(seq.seq_id)
            assert ids[i] == seq.token_ids[-1] and positions[i] == t - 1 and lens[i] == t
            assert slots[i] == table[(t - 1) // bs] * bs + (t - 1) % bs
            assert tables[i, :len(table)].tolist() == table and not tables[i, len(table):].any()
        assert (ids[n:] == 0).all() and (positions[n:] == 0).all() and (slots[n:] == -1).all()
        assert (lens[n:] == 1).all() and not tables[n:].any()
