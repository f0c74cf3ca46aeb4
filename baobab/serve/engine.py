"""The engine: requests in, :class:`RequestOutput` increments out, one step at a time.

A step is ``schedule() -> execute() -> update()`` (DESIGN principle 7): the scheduler picks
how many tokens each request advances, the runner computes them in one batched forward and
returns the logits of the requests that sample, and the update samples, detokenizes,
checks stop conditions and frees the KV cache of finished requests. A request that asks for
prompt logprobs also gets every row of its prompt chunks scored as they are computed
(log_softmax + top-k, chunk by chunk), handed out with its first output; one for 0 tokens
finishes once its prompt is computed.

Three features ride on the step: prefix caching (the scheduler's planned copies of cached
blocks run before the forward, ``prefix_cache.py``), speculative decoding (decodes carry
proposals that the same forward verifies, ``speculative.py``) and structured output (a
grammar masks its own request's row before sampling, ``structured.py``).

The engine is single-threaded; :class:`~baobab.serve.engine_core.EngineCore` drives it one
round at a time, on a thread (``async_engine.py``) or in a process (``engine_process.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.models.gpt import GPT
from baobab.serve.config import EngineConfig
from baobab.serve.detokenize import IncrementalDetokenizer
from baobab.serve.kv_cache import num_blocks_for
from baobab.serve.prefix_cache import block_hashes
from baobab.serve.runner import ModelRunner, SeqInput
from baobab.serve.sampler import make_generator, sample_rows, top_logprobs
from baobab.serve.scheduler import SchedRequest, ScheduledSeq, Scheduler
from baobab.serve.speculative import DraftProposer, NgramProposer, accept, target_probs
from baobab.serve.structured import Grammars, consume
from baobab.serve.types import (
    EngineStats,
    PromptTooLongError,
    RequestOutput,
    SamplingParams,
    SpecStats,
    TokenLogprob,
    merge_outputs,
)


def check_request(
    prompt_ids: list[int], params: SamplingParams, context_length: int, vocab_size: int
) -> None:
    """Raise PromptTooLongError or ValueError (one sentence) for a request that can't run in
    a model of ``context_length`` positions and ``vocab_size`` prompt ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; send at least one token.")
    if params.max_tokens < 0:
        raise ValueError(f"max_tokens must be at least 0; got {params.max_tokens}.")
    if len(prompt_ids) + params.max_tokens > context_length:
        raise PromptTooLongError(len(prompt_ids), params.max_tokens, context_length)
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"prompt token id {bad} is outside the vocabulary (ids 0..{vocab_size - 1})."
        )


class Request(SchedRequest):
    """A request as the engine tracks it: the scheduler's counts plus token values."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        stop_ids: frozenset[int],
        device: torch.device,
        block_hashes: list[bytes],
    ) -> None:
        super().__init__(request_id, len(prompt_ids), params.max_tokens)
        self.block_hashes = block_hashes
        self.params = params
        self.token_ids = list(prompt_ids)  # prompt + output; num_tokens == len(token_ids)
        self.num_output = 0
        self.stop_ids = stop_ids
        self.generator = make_generator(params.seed, device) if params.temperature > 0 else None
        self.detok = IncrementalDetokenizer(tokenizer, params.stop)
        self.draft_computed = 0  # positions whose draft-model keys and values are valid
        self.matcher = None  # the llguidance matcher of params.grammar (structured.py)
        # Prompt logprobs need every prompt row computed: no prefix reused.
        self.reuse_prefix = params.prompt_logprobs is None
        # Prompt logprobs as the prefill chunks are scored (the first token has none), until
        # the first output takes them.
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            None if params.prompt_logprobs is None else [None]
        )

    def take_prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        taken, self.prompt_logprobs = self.prompt_logprobs, None
        return taken


class Engine:
    """Continuous batching over a GPT export: add requests, abort them, ``step()``."""

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, config: EngineConfig, draft: GPT | None = None
    ) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"the engine serves gpt models; got a {type(model).__name__}.")
        self.config = config
        self.tokenizer = tokenizer
        cfg = model.cfg
        dtype = model.tok_embeddings.weight.dtype
        num_blocks = num_blocks_for(cfg, dtype, config.kv_cache_bytes(), config.block_size)
        self.runner = ModelRunner(
            model, num_blocks, config.block_size, config.prefill_chunk_size, config.pack_weights
        )
        self.scheduler = Scheduler(
            num_blocks,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.prefill_chunk_size,
            config.max_queue,
            config.prefix_caching,
        )
        self.context_length = cfg.max_seq_len
        # Prompt ids must be real tokens. Sampling covers the model's whole vocabulary, as
        # Hugging Face and vLLM do: ids past the tokenizer's (the trainer rounds vocab_size
        # up) are ones a trained model has learnt never to produce, and they decode to "".
        self.vocab_size = min(tokenizer.vocab_size, cfg.vocab_size)
        self.eos_token_id: int | None = tokenizer.eot_id
        self._seqs: dict[str, Request] = {}
        self.proposer: NgramProposer | DraftProposer | None = None
        if draft is not None:
            self.proposer = DraftProposer(
                draft, num_blocks, config.block_size, config.prefill_chunk_size, config.pack_weights
            )
        elif config.speculative == "ngram":
            self.proposer = NgramProposer(config.ngram_min, config.ngram_max)
        self.spec_stats = SpecStats()
        self.grammars = Grammars(tokenizer)  # structured output's matchers

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptTooLongError or ValueError (one sentence) for a request that can't run.

        Reads no engine state, so any thread may call it.
        """
        check_request(prompt_ids, params, self.context_length, self.vocab_size)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises PromptTooLongError, QueueFullError or ValueError."""
        self.check_request(prompt_ids, params)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_token_id is not None:
            stop_ids.add(self.eos_token_id)
        prompt_ids = [int(t) for t in prompt_ids]
        seq = Request(
            request_id,
            prompt_ids,
            params,
            self.tokenizer,
            frozenset(stop_ids),
            self.runner.device,
            self._block_hashes(prompt_ids),
        )
        if params.grammar is not None:
            seq.matcher = self.grammars.matcher(params.grammar)  # ValueError
        self.scheduler.add(seq)  # QueueFullError, duplicate id
        self._seqs[request_id] = seq

    def _block_hashes(self, prompt_ids: list[int]) -> list[bytes]:
        """Hashes of the prompt's blocks in whole chunks (what prefix caching can hold)."""
        cache = self.scheduler.prefix
        if cache is None:
            return []
        return block_hashes(prompt_ids, cache.block_size, cache.cacheable_tokens(len(prompt_ids)))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request now (its cache is free for the next step); its final output, or
        None if the request is unknown or already finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.abort(request_id)
        return RequestOutput(
            request_id,
            [],
            "",
            finished=True,
            finish_reason="abort",
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
        )

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def request_ids(self) -> list[str]:
        return list(self._seqs)

    def stats(self) -> EngineStats:
        s = self.scheduler
        total = s.blocks.num_blocks
        prefix = s.prefix
        return EngineStats(
            prefix_cache_queries=prefix.queries if prefix is not None else 0,
            prefix_cache_hits=prefix.hits if prefix is not None else 0,
            spec=dataclasses.replace(self.spec_stats),
            running=s.num_running,
            waiting=s.num_waiting,
            kv_cache_usage=s.blocks_used / total,
            kv_cache_blocks_total=total,
            kv_cache_blocks_used=s.blocks_used,
            free_slots=s.free_slots(),
        )

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """schedule() -> execute() -> update(); the outputs of requests that got a token."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        for blocks, first in self.scheduler.take_copies():
            self.runner.cache.copy_blocks(blocks, first)
        inputs = [
            SeqInput(
                s.request.block * self.scheduler.block_size,
                s.start,
                s.request.token_ids[s.start : s.start + s.num_tokens],
                s.sample,
                s.request.prompt_logprobs is not None and s.request.is_prefill,
            )
            for s in plan
        ]
        proposed = self._propose(plan)  # {index in plan: (proposals, draft distributions)}
        for i, (tokens, _) in proposed.items():
            inputs[i] = inputs[i]._replace(token_ids=[*inputs[i].token_ids, *tokens], verify=True)
        logits = self.runner.execute(inputs)  # (N, V): one row per sample, k + 1 per verify
        self.scheduler.update(plan)
        if not proposed and not any(inp.all_rows for inp in inputs):
            return self._update([s.request for s in plan if s.sample], logits)
        rows, verified, sampled, row = [], [], [], 0
        for i, (s, inp) in enumerate(zip(plan, inputs)):
            n = len(inp.token_ids) if inp.all_rows or inp.verify else int(inp.sample)
            if inp.verify:
                verified.append((s, logits[row : row + n], *proposed[i]))
            else:
                if inp.all_rows:
                    self._score_prompt(s.request, inp, logits[row : row + n])
                if inp.sample:
                    sampled.append(s.request)
                    rows.append(row + n - 1)
            row += n
        outputs = self._update(sampled, logits[rows])
        return outputs + [self._verify(*v) for v in verified]

    def _propose(
        self, plan: list[ScheduledSeq]
    ) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Speculative proposals for the plan's decodes that can take them: up to
        ``num_speculative_tokens``, never past ``max_tokens``."""
        if self.proposer is None:
            return {}
        wanted = []
        for i, s in enumerate(plan):
            r = s.request
            k = min(self.config.num_speculative_tokens, r.params.max_tokens - r.num_output - 1)
            # Not for logprobs or a grammar: those read or mask one row at a time.
            plain = r.params.logprobs is None and r.matcher is None
            if s.sample and not r.is_prefill and k > 0 and plain:
                wanted.append((i, r, k))
        if isinstance(self.proposer, NgramProposer):
            found = ((i, self.proposer.propose(r.token_ids, k)) for i, r, k in wanted)
            return {i: (tokens, None) for i, tokens in found if tokens}
        bs = self.scheduler.block_size
        drafts = self.proposer.propose([(r, r.block * bs, k) for _, r, k in wanted])
        return {i: d for (i, _, _), d in zip(wanted, drafts)}

    def _verify(
        self,
        s: ScheduledSeq,
        logits: torch.Tensor,
        proposals: list[int],
        draft: torch.Tensor | None,
    ) -> RequestOutput:
        """Keep what the target accepts of ``proposals`` (``speculative.accept``), emit it
        plus one token, and roll the request's computed count back to the kept tokens."""
        r: Request = s.request
        tokens = accept(target_probs(logits, r.params), proposals, draft, r.params, r.generator)
        r.num_computed = s.start + len(tokens)  # the last token and the accepted proposals
        r.draft_computed = min(r.draft_computed, r.num_computed)
        self.spec_stats.drafts += 1
        self.spec_stats.draft_tokens += len(proposals)
        self.spec_stats.accepted_tokens += len(tokens) - 1
        outputs = []
        for token in tokens:
            outputs.append(self._append(r, token, None))
            if outputs[-1].finished:
                break
        return merge_outputs(outputs)

    def _score_prompt(self, seq: Request, inp: SeqInput, logits: torch.Tensor) -> None:
        """Add the prompt logprobs of one ``all_rows`` chunk (its rows' ``logits``) to
        ``seq``: row j scores prompt token start + j + 1; the last chunk's last row scores
        the first sampled token instead."""
        scored = min(len(inp.token_ids), seq.prompt_len - 1 - inp.start)
        targets = seq.token_ids[inp.start + 1 : inp.start + 1 + scored]
        if targets:
            k = seq.params.prompt_logprobs
            found = top_logprobs(logits[:scored], targets, [k] * scored)
            seq.prompt_logprobs += [
                self._token_logprob(t, lp, top) for t, (lp, top) in zip(targets, found)
            ]

    def _update(self, seqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        if not seqs:
            return []
        outputs = [self._finish_unsampled(s) for s in seqs if s.params.max_tokens == 0]
        if outputs:  # prompts only scored: their rows are not sampled
            kept = [i for i, s in enumerate(seqs) if s.params.max_tokens > 0]
            seqs, logits = [seqs[i] for i in kept], logits[kept]
            if not seqs:
                return outputs
        # Grammar rows sample from a masked copy; logprobs stay the raw logits' (as vLLM's).
        masked = self.grammars.mask(logits, [s.matcher for s in seqs])
        tokens = sample_rows(masked, [s.params for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if want:
            found = top_logprobs(
                logits[want], [tokens[i] for i in want], [seqs[i].params.logprobs for i in want]
            )
            for i, (lp, top) in zip(want, found):
                logprobs[i] = self._token_logprob(tokens[i], lp, top)
        outputs += [
            self._append(s, t, logprobs.get(i)) for i, (s, t) in enumerate(zip(seqs, tokens))
        ]
        return outputs

    def _token_logprob(self, token: int, lp: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text = self.tokenizer.decode([token])
        alternatives: dict[str, float] = {}
        for tid, value in top:  # most likely first: a text shared by two ids keeps the first
            alternatives.setdefault(self.tokenizer.decode([tid]), value)
        return TokenLogprob(token, text, lp, alternatives)

    def _append(self, seq: Request, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Add a sampled token to ``seq``; finish it on a stop token, stop string or length."""
        seq.token_ids.append(token)
        seq.num_tokens += 1
        seq.num_output += 1
        reason = None
        if token in seq.stop_ids:  # counted and reported, but its text is not output
            text, reason = seq.detok.finish(), "stop"
        else:
            text = seq.detok.add([token])
            complete = seq.matcher is not None and consume(seq.matcher, token)
            if seq.detok.stop_string is not None:
                reason = "stop"
            elif complete or seq.num_output >= seq.params.max_tokens:
                text, reason = text + seq.detok.finish(), "stop" if complete else "length"
        if reason is not None:
            self.scheduler.finish(seq)
            del self._seqs[seq.request_id]
        return RequestOutput(
            seq.request_id,
            [token],
            text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=[logprob] if logprob is not None else None,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
            prompt_logprobs=seq.take_prompt_logprobs(),
        )

    def _finish_unsampled(self, seq: Request) -> RequestOutput:
        """A request for 0 tokens whose prompt is computed (and scored): done."""
        self.scheduler.finish(seq)
        del self._seqs[seq.request_id]
        return RequestOutput(
            seq.request_id,
            [],
            "",
            finished=True,
            finish_reason="length",
            prompt_tokens=seq.prompt_len,
            prompt_logprobs=seq.take_prompt_logprobs(),
        )
