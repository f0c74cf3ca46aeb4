"""The serving engine's configuration: memory budget, batch limits, queue, device, dtype.

One dataclass validated where it is built (DESIGN principle 4); the CLI turns every field
into a flag. The KV cache is ``kv_cache_memory_gib`` of keys and values preallocated at
start-up, split into blocks of ``block_size`` tokens; each running request holds a
contiguous run of blocks for its prompt + max_tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from baobab.models.common import check_choice, check_positive

DTYPES = ("float32", "bfloat16", "float16")

# Weights from which ``threads=0`` uses every core (EngineConfig.threads).
ALL_CORES_MIN_WEIGHT_BYTES = 64 * 2**20


@dataclass
class EngineConfig:
    """How the engine uses memory and batches work.

    Args:
        kv_cache_memory_gib: memory preallocated at start-up for the KV cache, in GiB; it
            must hold at least one request of the model's full context.
        block_size: tokens per KV-cache block: the unit a request's reservation (prompt +
            max_tokens) is rounded up to, and that cache usage is reported in.
        max_num_seqs: most requests running (holding KV cache) at once.
        max_num_batched_tokens: prompt tokens prefilled per engine step, beside one token
            for each running decode, so a long prompt never stalls running decodes for more
            than one chunk's compute.
        prefill_chunk_size: prompts are prefilled in chunks that start at multiples of this
            many tokens, whatever else is in the batch, so a request's numerics (and greedy
            output) do not depend on its batch mates; at most ``max_num_batched_tokens``.
        max_queue: most requests waiting with no sequence slot (or, while the KV cache is
            what keeps them out, no cache) to start in; one more is refused (HTTP 429). Free
            slots absorb requests, so a burst of ``max_num_seqs + max_queue`` on an idle
            engine is admitted whole; a request's ``n`` choices are admitted in one check,
            and an ``n`` above ``max_num_seqs + max_queue`` is refused (HTTP 400). The rule:
            ``EngineClient._admit``.
        device: torch device the model runs on ("cpu", "cuda", "cuda:1", ...).
        dtype: cast the weights to "float32", "bfloat16" or "float16"; unset keeps the
            export's dtype (quantized exports keep theirs).
        threads: torch intra-op threads on CPU. 0 chooses: one per core when the weights
            are at least ``ALL_CORES_MIN_WEIGHT_BYTES`` (a step then takes tens of ms, next
            to which the HTTP work of its few tokens is small), else one per core but one,
            left to the HTTP event loop (an OpenMP worker that loses its core to it stalls
            every op of a short step).
        pack_weights: on CPU, reorder large float32 linear weights once for oneDNN
            (memory-bound batch-1 decode at full speed); off, every linear runs through MKL.
            Either way a row's result does not depend on the batch size.
        prefix_caching: keep the keys and values of full prompt blocks after their request
            ends (content-hashed, least recently used evicted first) and let a new request
            whose prompt starts the same copy them instead of computing them; outputs are
            the same bits with it on or off.
        speculative: "off", or "ngram" (prompt lookup: propose what followed the last
            matching n-gram of the context, ``ngram_max`` down to ``ngram_min`` tokens long);
            setting ``draft`` (an export directory of a small model with the target's
            tokenizer, vocabulary and context) proposes with that model instead.
        num_speculative_tokens: most tokens proposed per request and step; all are verified
            in one target forward, and greedy output is the same bits as without.
        ngram_min: the shortest n-gram prompt lookup matches (``speculative`` "ngram").
        ngram_max: the longest n-gram it tries first.
        draft: an export directory whose model proposes the tokens (a draft model); it
            must share the target's tokenizer, vocabulary size and context length.
        separate_process: run the engine in its own (spawned) process, as vLLM's engine
            core: the HTTP process keeps the event loop and streams, and the engine's steps
            never wait on its GIL. Off: an engine thread in the calling process (tests,
            embedding; ``AsyncEngine.engine`` is then reachable).
        explain_share: while requests are running, explanations (``POST /v1/explain``)
            get this fraction of the engine's step time, in slices between steps, so
            running streams keep (1 - share) of their pace; between 0 (exclusive) and 1.
        explain_max_queue: most explanations queued or running at once; one more is
            refused (HTTP 429).
        explain_max_work: most work one explanation may ask for, in tokens (prompt and
            target; a completion's tokens each with their own context) × integration
            steps; more is refused (HTTP 400). The default takes 256 tokens at
            ``baobab explain``'s 512 steps.
    """

    kv_cache_memory_gib: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256
    prefill_chunk_size: int = 64
    max_queue: int = 256
    device: str = "cpu"
    dtype: str | None = None
    threads: int = 0
    pack_weights: bool = True
    prefix_caching: bool = True
    speculative: str = "off"
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft: str | None = None
    separate_process: bool = True
    explain_share: float = 0.1
    explain_max_queue: int = 4
    explain_max_work: int = 131072

    def __post_init__(self) -> None:
        check_positive(
            "EngineConfig",
            kv_cache_memory_gib=self.kv_cache_memory_gib,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefill_chunk_size=self.prefill_chunk_size,
            max_queue=self.max_queue,
            explain_max_queue=self.explain_max_queue,
            explain_max_work=self.explain_max_work,
        )
        for key in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "prefill_chunk_size",
            "max_queue",
            "explain_max_queue",
            "explain_max_work",
        ):
            if not isinstance(getattr(self, key), int):
                raise ValueError(
                    f"EngineConfig.{key} must be a positive integer; got {getattr(self, key)!r}."
                )
        share = self.explain_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ValueError(
                f"EngineConfig.explain_share must be a fraction in (0, 1]; got {share!r}."
            )
        if self.prefill_chunk_size > self.max_num_batched_tokens:
            raise ValueError(
                f"EngineConfig.prefill_chunk_size must be at most max_num_batched_tokens "
                f"({self.max_num_batched_tokens}); got {self.prefill_chunk_size}."
            )
        if self.dtype is not None:
            check_choice("EngineConfig", "dtype", self.dtype, DTYPES)
        check_choice("EngineConfig", "speculative", self.speculative, ("off", "ngram"))
        check_positive(
            "EngineConfig",
            num_speculative_tokens=self.num_speculative_tokens,
            ngram_min=self.ngram_min,
            ngram_max=self.ngram_max,
        )
        if self.ngram_min > self.ngram_max:
            raise ValueError(
                f"EngineConfig.ngram_min ({self.ngram_min}) must be at most ngram_max "
                f"({self.ngram_max})."
            )
        if self.draft is not None and self.speculative != "off":
            raise ValueError(
                "EngineConfig.draft proposes with a draft model; leave speculative 'off' with it "
                f"(got '{self.speculative}')."
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(
                f"EngineConfig.threads must be 0 (chosen by model size) or a positive integer; "
                f"got {self.threads!r}."
            )
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"EngineConfig.device must name a torch device such as 'cpu'; got {self.device!r}."
            )

    def num_threads(self, weight_bytes: int = 0) -> int:
        """The intra-op thread count ``threads`` asks for, serving ``weight_bytes`` of weights."""
        if self.threads:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cores = cores or 2
        return cores if weight_bytes >= ALL_CORES_MIN_WEIGHT_BYTES else max(1, cores - 1)

    def kv_cache_bytes(self) -> int:
        """The KV cache budget in bytes."""
        return int(self.kv_cache_memory_gib * 2**30)
