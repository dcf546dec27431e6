"""Continuous batching driven by a fake model that reads every token back from a simulated paged
cache: outputs are exact with plenty of blocks, unchanged under preemption by recompute; admission
limits, rejection and finish reasons."""

import random

import pytest

from quad_engine.block_manager import BlockManager
from quad_engine.sampling import SamplingParams
from quad_engine.scheduler import Scheduler, Sequence, Status

VOCAB = 50
EOS = 0


def next_token(token_ids: list[int]) -> int:
    """The fake model: deterministic in the whole sequence, sensitive to order and to every token."""
    return sum((i + 1) * t for i, t in enumerate(token_ids)) % (VOCAB - 1) + 1  # never EOS


def expected_outputs(prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class FakeEngine:
    """Writes each step's tokens to the cache slots the block manager gives, and runs the model on
    what it reads back through the block table: a wrong table, slot or recompute changes the output."""

    def __init__(self, scheduler: Scheduler, model=next_token):
        self.scheduler, self.blocks, self.model = scheduler, scheduler.blocks, model
        self.cache: dict[int, int] = {}
        self.steps: list[tuple[list[int], bool]] = []  # (seq ids, is_prefill) of every step
        self.fed: list[int] = []                          # tokens computed in every step

    def step(self) -> None:
        batch, is_prefill = self.scheduler.schedule()
        assert batch
        if not is_prefill:  # a decode step advances every running sequence
            assert batch == self.scheduler.running
        self.steps.append(([seq.seq_id for seq in batch], is_prefill))
        self.fed.append(sum(seq.num_scheduled_tokens if is_prefill else 1 for seq in batch))
        tokens = []
        for seq in batch:
            # The contract with the model runner: a prefill computes num_scheduled_tokens from
            # num_cached_tokens (0 unless it continues a long prompt's chunks), a decode feeds only
            # the last token, and the table has room for every position fed.
            if is_prefill:
                start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
                assert start == 0 or seq.num_tokens > self.scheduler.max_num_batched_tokens
            else:
                start, end = seq.num_tokens - 1, seq.num_tokens
                assert seq.num_cached_tokens == start
            for slot, token in zip(self.blocks.slot_mapping(seq.seq_id, start, end), seq.token_ids[start:end]):
                self.cache[slot] = token
            if end < seq.num_tokens:  # a chunk that is not the prompt's last: nothing to sample
                assert is_prefill and seq.status == Status.WAITING and len(batch) == 1
                tokens.append(None)
                continue
            assert seq.status == Status.RUNNING
            seen = [self.cache[s] for s in self.blocks.slot_mapping(seq.seq_id, 0, seq.num_tokens)]
            tokens.append(self.model(seen))
        self.scheduler.postprocess(batch, tokens)

    def run(self) -> None:
        while self.scheduler.has_unfinished():
            self.step()
            running = self.scheduler.running
            owned = [b for seq in running for b in self.blocks.block_table(seq.seq_id)]
            assert len(owned) == len(set(owned)), "two live sequences share a block"
            assert len(running) <= self.scheduler.max_num_seqs


def make(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=64, eos=EOS):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_num_batched_tokens, max_model_len, eos)


def random_prompts(count: int, seed: int = 0, longest: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, VOCAB - 1) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def generate(scheduler: Scheduler, prompts, params) -> list[Sequence]:
    seqs = [Sequence(i, p, params) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    FakeEngine(scheduler).run()
    return seqs


def test_with_plenty_of_blocks_every_sequence_gets_the_expected_tokens():
    prompts = random_prompts(20)
    sched = make()
    seqs = generate(sched, prompts, SamplingParams(max_tokens=16))
    for seq, prompt in zip(seqs, prompts):
        assert seq.status == Status.FINISHED and seq.finish_reason == "length"
        assert seq.output_token_ids == expected_outputs(prompt, 16)
    assert sched.num_preemptions == 0
    assert sched.blocks.num_free_blocks == 256 and not sched.blocks.tables


@pytest.mark.parametrize("block_size,num_blocks", [(4, 16), (1, 64), (8, 8)])
def test_preemption_by_recompute_does_not_change_the_outputs(block_size, num_blocks):
    prompts = random_prompts(20, seed=1)
    roomy = generate(make(), prompts, SamplingParams(max_tokens=24))
    tight_sched = make(num_blocks=num_blocks, block_size=block_size)
    tight = generate(tight_sched, prompts, SamplingParams(max_tokens=24))
    assert tight_sched.num_preemptions >= 1
    assert [s.output_token_ids for s in tight] == [s.output_token_ids for s in roomy]
    assert [s.finish_reason for s in tight] == [s.finish_reason for s in roomy]
    assert tight_sched.blocks.num_free_blocks == num_blocks and not any(tight_sched.blocks.allocator.refcount)


def test_the_most_recently_admitted_sequence_is_preempted_and_resumes_with_its_outputs():
    sched = make(num_blocks=4, block_size=4, max_model_len=16)
    seqs = [Sequence(i, [i + 1] * 3, SamplingParams(max_tokens=20)) for i in range(3)]
    seqs.append(Sequence(3, [9] * 4, SamplingParams(max_tokens=20)))
    for seq in seqs:
        sched.add(seq)
    engine = FakeEngine(sched)
    engine.step()                       # one block each: none left
    assert engine.steps[-1] == ([0, 1, 2, 3], True)
    engine.step()                       # 0, 1, 2 still fit in their block; 3 needs a second one
    assert engine.steps[-1] == ([0, 1, 2], False)
    late = seqs[3]
    assert late.status == Status.WAITING and list(sched.waiting) == [late] and 3 not in sched.blocks.tables
    assert late.num_cached_tokens == 0 and late.output_token_ids == [next_token([9] * 4)]
    engine.step()                       # 0 takes the free block; 1 needs one too: 2 is preempted
    assert engine.steps[-1] == ([0, 1], False)
    assert list(sched.waiting) == [seqs[2], late] and sched.num_preemptions == 2
    for _ in range(3):
        engine.step()
    assert engine.steps[-1] == ([0, 1], False) and len(seqs[1].output_token_ids) == 6
    engine.step()                       # 0 needs a third block: 1 goes back, ahead of the later 2 and 3
    assert engine.steps[-1] == ([0], False) and list(sched.waiting) == [seqs[1], seqs[2], late]
    engine.run()
    resumed = [(ids, fed) for (ids, prefill), fed in zip(engine.steps[7:], engine.fed[7:]) if prefill]
    assert resumed[0] == ([1], 3 + 6)   # its prompt and its 6 outputs are recomputed
    assert resumed[1][0][0] == 2
    for seq in seqs:                    # the context length (16) ends every sequence
        assert seq.output_token_ids == expected_outputs(seq.prompt_token_ids, 16 - len(seq.prompt_token_ids))
    assert sched.blocks.num_free_blocks == 4


def test_prompts_that_cannot_run_are_rejected():
    sched = make(max_model_len=32)
    with pytest.raises(ValueError, match="^empty prompt"):
        sched.add(Sequence(0, [], SamplingParams()))
    with pytest.raises(ValueError, match="context of 32 tokens"):
        sched.add(Sequence(1, [1] * 33, SamplingParams()))
    with pytest.raises(ValueError, match="context of 32 tokens"):
        sched.add(Sequence(2, [1] * 32, SamplingParams()))  # no room left for a generated token
    assert not sched.has_unfinished()


def test_a_sequence_stops_at_the_context_length_even_with_tokens_left():
    sched = make(max_model_len=32)
    short, full = Sequence(0, [3] * 31, SamplingParams(max_tokens=100)), Sequence(1, [4] * 20, SamplingParams(max_tokens=100))
    for seq in (short, full):
        sched.add(seq)
    FakeEngine(sched).run()
    assert short.output_token_ids == expected_outputs([3] * 31, 1) and short.finish_reason == "length"
    assert len(full.output_token_ids) == 12 and full.num_tokens == 32 and full.finish_reason == "length"


def test_a_cache_too_small_for_one_sequence_raises_instead_of_waiting_forever():
    sched = make(num_blocks=2, block_size=4, max_model_len=64)
    sched.add(Sequence(0, [1] * 6, SamplingParams(max_tokens=10)))
    engine = FakeEngine(sched)
    with pytest.raises(RuntimeError, match="needs 3 KV-cache blocks, more than the 2"):
        engine.run()


def scripted(outputs: dict[int, list[int]]):
    """A model that emits a fixed token list per prompt (keyed by its first token)."""
    def model(token_ids):
        script = outputs[token_ids[0]]
        return script[min(len(token_ids) - 4, len(script) - 1)]  # prompts are 4 tokens long
    return model


def test_finish_reasons_eos_stop_tokens_and_max_tokens():
    sched = make(max_model_len=64)
    script = {1: [5, 6, EOS, 7, 8], 2: [5, 6, EOS, 7, 8], 3: [5, 9, 6, 7, 8], 4: [5, 6, 7, 8, 9], 5: [EOS, 6, 9, 9, 9]}
    seqs = [Sequence(0, [1] * 4, SamplingParams(max_tokens=10)),
            Sequence(1, [2] * 4, SamplingParams(max_tokens=4, ignore_eos=True)),
            Sequence(2, [3] * 4, SamplingParams(max_tokens=10, stop_token_ids=[9])),
            Sequence(3, [4] * 4, SamplingParams(max_tokens=3, stop_token_ids=[9])),
            Sequence(4, [5] * 4, SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[9]))]
    for seq in seqs:
        sched.add(seq)
    FakeEngine(sched, scripted(script)).run()
    assert [(s.output_token_ids, s.finish_reason) for s in seqs] == [
        ([5, 6, EOS], "stop"),          # EOS is kept in the tokens (the detokenizer skips it)
        ([5, 6, EOS, 7], "length"),     # ignore_eos: runs to max_tokens
        ([5, 9], "stop"),               # a stop token id
        ([5, 6, 7], "length"),          # max_tokens before the stop token
        ([EOS, 6, 9], "stop"),          # stop token ids apply even with ignore_eos
    ]
    assert sched.blocks.num_free_blocks == 256


def test_finish_from_the_engine_frees_blocks_of_running_and_waiting_sequences():
    sched = make(max_num_seqs=1)
    a, b = Sequence(0, [1, 2], SamplingParams()), Sequence(1, [3], SamplingParams())
    sched.add(a)
    sched.add(b)
    FakeEngine(sched).step()
    sched.finish(a, "stop")             # a stop string, found by the engine in the text
    sched.finish(b, "stop")
    sched.finish(a, "length")           # finishing twice changes nothing
    assert a.finish_reason == "stop" and not sched.has_unfinished() and sched.blocks.num_free_blocks == 256


def test_prefill_respects_the_token_budget_and_the_sequence_limit():
    sched = make(max_num_seqs=4, max_num_batched_tokens=25)
    seqs = [Sequence(i, [i + 1] * 10, SamplingParams(max_tokens=5)) for i in range(6)]
    seqs.append(Sequence(6, [7] * 30, SamplingParams(max_tokens=5)))  # longer than the budget
    for seq in seqs:
        sched.add(seq)
    engine = FakeEngine(sched)
    engine.step()
    assert engine.steps[-1] == ([0, 1], True)           # a third prompt would make 30 > 25 tokens
    engine.step()
    assert engine.steps[-1] == ([2, 3], True)
    engine.step()
    assert engine.steps[-1] == ([0, 1, 2, 3], False)    # 4 running: no more admitted
    engine.run()
    prefills = [ids for ids, prefill in engine.steps if prefill]
    assert [i for ids in prefills for i in ids] == list(range(6)) + [6, 6]  # first come, first served
    assert prefills[-2:] == [[6], [6]]                  # over the budget: alone, in two chunks (25 + 5)
    for (ids, prefill), fed in zip(engine.steps, engine.fed):
        assert not prefill or fed <= 25
    assert all(s.output_token_ids == expected_outputs(s.prompt_token_ids, 5) for s in seqs)


def test_random_workloads_hold_every_limit_and_leak_nothing():
    rng = random.Random(0)
    preemptions = 0
    for trial in range(20):
        block_size = rng.choice([1, 2, 4, 8])
        max_model_len = rng.randint(8, 48)
        num_blocks = -(-max_model_len // block_size) + rng.randint(0, 12)
        budget = rng.randint(1, 64)
        sched = make(num_blocks, block_size, rng.randint(1, 6), budget, max_model_len)
        prompts = random_prompts(25, seed=trial, longest=max_model_len - 1)
        params = [SamplingParams(max_tokens=rng.randint(1, 40)) for _ in prompts]
        seqs = [Sequence(i, p, q) for i, (p, q) in enumerate(zip(prompts, params))]
        for seq in seqs:
            sched.add(seq)
        engine = FakeEngine(sched)
        engine.run()
        for seq in seqs:
            n = min(seq.params.max_tokens, max_model_len - len(seq.prompt_token_ids))
            assert seq.output_token_ids == expected_outputs(seq.prompt_token_ids, n)
        for (ids, prefill), fed in zip(engine.steps, engine.fed):
            assert not prefill or fed <= budget  # long prompts run in chunks of the budget
        assert any(prefill for _, prefill in engine.steps[1:])  # admissions happen along the way
        assert sched.blocks.num_free_blocks == num_blocks and not any(sched.blocks.allocator.refcount)
        preemptions += sched.num_preemptions
    assert preemptions > 0


def test_a_long_prompt_prefills_in_chunks_holding_its_blocks():
    """A prompt longer than the budget: budget-sized chunks, alone, each from where the last one
    stopped, with its blocks taken once; then it decodes with the others. Finishing it part-way
    through returns its blocks."""
    sched = make(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    long_seq = Sequence(0, list(range(1, 21)), SamplingParams(max_tokens=3))  # 20 tokens: 8 + 8 + 4
    short = Sequence(1, [5, 6, 7], SamplingParams(max_tokens=3))
    sched.add(long_seq)
    sched.add(short)
    engine = FakeEngine(sched)
    for _ in range(2):
        engine.step()
    assert engine.steps == [([0], True), ([0], True)] and engine.fed == [8, 8]
    assert long_seq.num_cached_tokens == 16 and long_seq.status == Status.WAITING and not long_seq.output_token_ids
    assert sched.blocks.num_free_blocks == 64 - 5     # all 20 tokens' blocks, taken at the first chunk
    engine.step()
    assert engine.steps[-1] == ([0, 1], True) and engine.fed[-1] == 7  # its last 4 tokens, and the short one
    engine.run()
    assert long_seq.output_token_ids == expected_outputs(long_seq.prompt_token_ids, 3)
    assert short.output_token_ids == expected_outputs(short.prompt_token_ids, 3)
    assert sched.blocks.num_free_blocks == 64

    sched = make(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    seq = Sequence(0, list(range(1, 21)), SamplingParams(max_tokens=3))
    sched.add(seq)
    FakeEngine(sched).step()
    sched.finish(seq, "stop")
    assert sched.blocks.num_free_blocks == 64 and not sched.has_unfinished()
