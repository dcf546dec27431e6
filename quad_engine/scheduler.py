"""Continuous batching: sequences, and the scheduler that picks each step's batch.

A step is either a prefill of newly admitted sequences or one decode token for every running
sequence. A sequence longer than the step's token budget prefills alone, in budget-sized chunks
over consecutive steps (each chunk attends to the ones before it in the cache), so a long prompt's
activations stay bounded; it joins the running sequences with its last chunk. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed (prompt + tokens
generated so far) as a prefill when memory allows.
"""

from __future__ import annotations

from collections import deque
from enum import Enum, auto

from quad_engine.block_manager import BlockManager
from quad_engine.sampling import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = seq_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.num_cached_tokens = 0   # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0  # tokens the current prefill step computes (after the cached ones)
        self.finish_reason: str | None = None
        self.generator = None        # per-request torch.Generator when seeded

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        """The token a decode step feeds (token_ids[-1] without building token_ids)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_id: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        n = len(seq.prompt_token_ids)
        if n == 0:
            raise ValueError("empty prompt: give at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_model_len} tokens "
                             f"(it needs room for at least one generated token)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(batch, is_prefill). Prefill first: admit waiting sequences in order while the token
        budget, the sequence limit and free blocks allow; a sequence longer than the whole budget
        runs alone, one budget-sized chunk a step (it stays at the head of the queue, blocks held,
        until its last chunk). Otherwise one decode token for every running sequence."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens  # a resumed sequence recomputes its generated tokens too
            todo = n - seq.num_cached_tokens
            if batch and tokens + todo > self.max_num_batched_tokens:
                break
            if seq.num_cached_tokens == 0:  # its first step: blocks for the whole sequence
                if not self.blocks.can_allocate(n):
                    break
                self.blocks.allocate(seq.seq_id, n)
            seq.num_scheduled_tokens = min(todo, self.max_num_batched_tokens)
            batch.append(seq)
            tokens += seq.num_scheduled_tokens
            if seq.num_scheduled_tokens < todo:
                break  # a chunk of a long sequence: alone in its step
            self.waiting.popleft()
            seq.status = Status.RUNNING
        if batch:
            self.running += [seq for seq in batch if seq.status == Status.RUNNING]
            return batch, True
        if not self.running and self.waiting:
            # Every block is free and the head still does not fit: waiting would never end.
            n = self.waiting[0].num_tokens
            raise RuntimeError(f"a sequence of {n} tokens needs {self.blocks.blocks_needed(n)} KV-cache blocks, "
                               f"more than the {self.blocks.num_free_blocks} the cache has")
        for seq in list(self.running):
            # The step feeds the last token at position num_tokens - 1: the table must hold num_tokens.
            while seq.status == Status.RUNNING and not self.blocks.can_append(seq.seq_id, seq.num_tokens):
                self._preempt(self.running[-1])
            if seq.status == Status.RUNNING:
                self.blocks.append_slot(seq.seq_id, seq.num_tokens)
                batch.append(seq)
        if not batch:
            # The only running sequence preempted itself: admit it again, or say why it cannot run.
            return self.schedule()
        return batch, False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status, seq.num_cached_tokens = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None]) -> None:
        """Append each sequence's new token; finish those that hit EOS, a stop token, max_tokens or
        the context length. A prefill chunk that is not a sequence's last (token None) only
        advances what the cache holds."""
        for seq, token in zip(seqs, token_ids):
            if seq.status == Status.WAITING:
                seq.num_cached_tokens += seq.num_scheduled_tokens
                continue
            seq.output_token_ids.append(token)
            seq.num_cached_tokens = seq.num_tokens - 1
            p = seq.params
            if (token == self.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
                self.finish(seq, "stop")
            elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        else:
            self.waiting.remove(seq)
            if seq.num_cached_tokens > 0:  # part-way through a chunked prefill: it holds blocks
                self.blocks.free(seq.seq_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
