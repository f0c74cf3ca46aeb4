"""Save and load resumable checkpoints through torch.distributed.checkpoint (DCP).

A checkpoint directory (``run_dir/checkpoints/step_00000100/``) holds::

    .metadata, __<rank>_<n>.distcp   DCP: ``model.<fqn>`` weights and ``optim.<key>`` state
    trainer_state.json/.safetensors  step, schedule, data position, RNG (no pickle)
    tokenizer.json                   when the run has one, so the checkpoint stands alone
    meta.json                        the model description, step and a checksum (XXH3-128)
                                     of every other file (``checksum.py``); written last

Model and optimizer state are keyed by parameter FQN (``get_model_state_dict`` and a
flattened ``get_optimizer_state_dict``), so a checkpoint saved under one layout (FSDP on
4 ranks, pipeline stages, one process) loads under any other: DCP reshards on load.

Saving (every rank calls :func:`save_checkpoint`):

1. finish a pending async save, if any;
2. rank 0 finishes publishes a crash interrupted, sweeps the other leftovers of crashed
   saves, creates ``.tmp-step_XXXXXXXX`` and writes (and fsyncs) trainer_state and
   tokenizer.json into it (every rank waits for it);
3. every rank writes its shards with ``dcp.save`` (or ``dcp.async_save``), which fsyncs them,
   hashing each file as it writes it;
4. once DCP has completed everywhere, rank 0 gathers every rank's checksums, writes
   meta.json atomically, renames the temporary directory to ``step_XXXXXXXX`` in one
   ``os.replace`` and prunes to ``keep_last``; every rank returns only after that.

A crash at any point leaves the previous checkpoints loadable; only directories holding a
meta.json count (``layout.py`` lists the invariants, ``verify.py`` checks a checkpoint's
files before a resume trusts it). Every load checks the checksums too: meta.json and
``.metadata`` before DCP unpickles anything, the shards on a thread while DCP reads them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from baobab.checkpoint import checksum
from baobab.checkpoint.layout import (
    META_FILE,
    TMP_PREFIX,
    TOKENIZER_FILE,
    checkpoint_root,
    fsync_file,
    prune,
    publish,
    recover_interrupted,
    resolve_checkpoint,
    step_name,
    sweep_incomplete,
    write_text_atomic,
)
from baobab.checkpoint.trainer_state import load_trainer_state, save_trainer_state
from baobab.checkpoint.verify import LoadCheck

# Optimizer state keyed by parameter FQN ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"),
# so it reshards like the weights and pipeline stages' dicts merge without renumbering.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# DCP warns on every single-process save/load; running without a process group is intended.
_NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"
warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)  # also covers the async thread


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence that warning where a caller's filters (e.g. pytest's) were reset."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _on_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; every rank returns after it did, and raises if it failed."""
    if not _distributed():
        fn()
        return
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as err:  # re-raised below, after the other ranks have heard of it
            error = err
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise RuntimeError(f"rank 0 could not write the checkpoint: {box[0]}")


# -- state dicts ------------------------------------------------------------------------------
@dataclass
class _State:
    """The DCP state dict ``{"model": {fqn: tensor}, "optim": {key: value}}`` of all parts."""

    dcp: dict[str, dict[str, Any]]
    model_keys: list[list[str]]  # per model part
    optim_keys: list[list[str]]  # per model part (empty without an optimizer)


def _collect(model_parts: Sequence[nn.Module], optimizers: Sequence[Optimizer]) -> _State:
    if optimizers and len(optimizers) != len(model_parts):
        raise ValueError(
            f"pass one optimizer per model part or none, not {len(optimizers)} optimizers "
            f"for {len(model_parts)} model parts"
        )
    state = _State({"model": {}, "optim": {}}, [], [])
    for i, part in enumerate(model_parts):
        model_sd = get_model_state_dict(part)
        optim_sd = (
            get_optimizer_state_dict(part, optimizers[i], options=_OPTIONS) if optimizers else {}
        )
        for name, sd in (("model", model_sd), ("optim", optim_sd)):
            shared = state.dcp[name].keys() & sd.keys()
            if shared:
                raise ValueError(
                    f"model parts must hold disjoint parameters, but '{min(shared)}' is in two"
                )
            state.dcp[name].update(sd)
        state.model_keys.append(list(model_sd))
        state.optim_keys.append(list(optim_sd))
    return state


# -- saving -----------------------------------------------------------------------------------
@dataclass
class _PendingSave:
    tmp: Path
    final: Path
    run_dir: Path
    meta_text: str
    keep_last: int
    writer: checksum.HashingWriter
    files: dict[str, dict[str, Any]]  # checksums of rank 0's own files (trainer_state, ...)
    future: Future | None = None

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()  # raises here if the background write failed
        files = {**self.files, **self.writer.files}
        if _distributed():  # each rank hashed the files it wrote; rank 0 records them all
            pieces: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(pieces, self.writer.files)
            files.update({k: v for piece in pieces for k, v in piece.items()})

        def finalize() -> None:
            text = checksum.seal(json.loads(self.meta_text), files, self.writer.algorithm)
            write_text_atomic(self.tmp / META_FILE, text)  # the mark of a whole one
            publish(self.tmp, self.final)
            prune(self.run_dir, self.keep_last, keep=self.final)

        _on_rank0(finalize)
        return self.final


_pending: list[_PendingSave] = []  # at most one async save in flight per process
_async_group: dict[str, Any] = {}  # {"world": default group, "group": its gloo twin}


def _gloo_group() -> Any:
    """A separate gloo group for the background thread's collectives (None without dist).

    The async writer coordinates from its own thread; on the default group its collectives
    could interleave with the training loop's (FSDP all-gathers, barriers).
    """
    if not _distributed():
        return None
    if _async_group.get("world") is not dist.group.WORLD:
        _async_group.update(world=dist.group.WORLD, group=dist.new_group(backend="gloo"))
    return _async_group["group"]


def wait_for_checkpoint() -> Path | None:
    """Complete the pending async save, if any, and return its directory.

    Collective: call it on every rank (the trainer does, before exiting and before the next
    save, which also calls it). A save still pending at exit is simply never published.
    """
    if not _pending:
        return None
    return _pending.pop().finish()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_parts: Sequence[nn.Module],
    optimizers: Sequence[Optimizer],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_file: str | Path | None = None,
    keep_last: int = 3,
    async_save: bool = False,
) -> Path:
    """Write the checkpoint of ``step`` on every rank; returns its (future) directory.

    ``model_parts`` are this rank's modules (one, or several pipeline stages), each with its
    optimizer in ``optimizers`` (or no optimizers at all). ``trainer_state`` holds JSON
    values and tensors (see ``trainer_state.py``); ``meta`` is the model description (JSON).
    With ``async_save`` the shards are copied to CPU memory and written in the background;
    the checkpoint appears once :func:`wait_for_checkpoint` (or the next save) completes it.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    wait_for_checkpoint()
    state = _collect(model_parts, optimizers).dcp  # refuses bad arguments before any write
    root = checkpoint_root(run_dir)
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    meta_text = json.dumps({**meta, "step": step}, indent=2)  # checked and frozen now

    writer = checksum.HashingWriter(tmp)
    files: dict[str, dict[str, Any]] = {}  # filled on rank 0

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        recover_interrupted(root)
        sweep_incomplete(root)
        tmp.mkdir()
        save_trainer_state(trainer_state, tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        for path in tmp.iterdir():  # durable before meta.json may vouch for them
            fsync_file(path)
            if writer.algorithm is not None:  # small, still in the page cache
                files[path.name] = checksum.hash_file(path, writer.algorithm)

    _on_rank0(prepare)
    pending = _PendingSave(tmp, final, Path(run_dir), meta_text, keep_last, writer, files)
    no_dist = not _distributed()
    if not async_save:
        with _quiet():
            dcp.save(state, storage_writer=writer, no_dist=no_dist)
        return pending.finish()
    response = dcp.async_save(
        state, storage_writer=writer, process_group=_gloo_group(), no_dist=no_dist
    )
    pending.future = getattr(response, "upload_completion", response)
    _pending.append(pending)
    return final


# -- loading ----------------------------------------------------------------------------------
def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None  # DTensor: global


def _check_and_trim(ckpt: Path, state: _State, gather: bool) -> None:
    """Refuse a checkpoint that does not fit the model, in one sentence, on every rank alike.

    Optimizer hyperparameters the checkpoint lacks (``param_groups.*``, e.g. a flag a newer
    torch added) keep their current values instead of failing the load.
    """
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    wanted = {f"model.{k}": _shape(v) for k, v in state.dcp["model"].items()}
    wanted_state = [f"optim.{k}" for k in state.dcp["optim"] if k.startswith("state.")]
    if gather:  # pipeline stages hold different FQNs: judge the union, identically everywhere
        pieces: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, (wanted, wanted_state))
        wanted = {k: v for piece in pieces for k, v in piece[0].items()}
        wanted_state = sorted({k for piece in pieces for k in piece[1]})
    saved_model = {k for k in saved if k.startswith("model.")}
    missing = sorted(wanted.keys() - saved.keys())
    unexpected = sorted(saved_model - wanted.keys())
    problems = [f"it lacks {_short(missing)}"] if missing else []
    problems += [f"it has {_short(unexpected)} which the model lacks"] if unexpected else []
    for key, shape in wanted.items():
        entry = saved.get(key)
        if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != shape:
            problems.append(
                f"'{key[6:]}' is {list(entry.size)} there but {list(shape or ())} in the model"
            )
            break
    if problems:
        raise ValueError(f"checkpoint '{ckpt}' does not match the model: {'; '.join(problems)}")
    lacking = [k for k in wanted_state if k not in saved]
    if lacking:
        raise ValueError(
            f"checkpoint '{ckpt}' does not match the optimizer: it lacks {_short(lacking)}"
        )
    for keys in state.optim_keys:
        for key in [k for k in keys if f"optim.{k}" not in saved]:  # only param_groups.* left
            keys.remove(key)
            del state.dcp["optim"][key]


def _short(keys: list[str]) -> str:
    first = keys[0].split(".", 1)[1]  # drop the "model."/"optim." prefix
    return f"'{first}'" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


def _load_into(
    ckpt: Path,
    model_parts: Sequence[nn.Module],
    optimizers: Sequence[Optimizer],
    check: LoadCheck,
) -> None:
    state = _collect(model_parts, optimizers)
    _check_and_trim(ckpt, state, gather=check.distributed)
    check.start()  # the shards' checksums, on a thread while DCP reads them
    try:
        with _quiet():  # fills the templates in place
            dcp.load(state.dcp, checkpoint_id=ckpt, no_dist=not check.distributed)
    except (Exception, dcp.CheckpointException) as err:  # the latter is a BaseException
        check.finish(err)  # "damaged" in one sentence when a checksum explains the failure
        raise
    check.finish(None)
    model_sd, optim_sd = state.dcp["model"], state.dcp["optim"]
    for i, part in enumerate(model_parts):
        set_model_state_dict(part, {k: model_sd[k] for k in state.model_keys[i]})
        if optimizers:
            own = {k: optim_sd[k] for k in state.optim_keys[i]}
            set_optimizer_state_dict(part, optimizers[i], own, options=_OPTIONS)


def load_checkpoint(
    path: str | Path,
    model_parts: Sequence[nn.Module],
    optimizers: Sequence[Optimizer],
) -> dict[str, Any]:
    """Load weights and optimizer state in place, whatever the current layout; returns the
    trainer_state. ``path`` is a checkpoint or a run directory (its newest checkpoint).

    Under torch.distributed call it on every rank; without a process group it reads the
    whole checkpoint in this process.
    """
    ckpt = resolve_checkpoint(path)
    check = LoadCheck(ckpt, _distributed())  # refuses a damaged meta.json or .metadata
    _load_into(ckpt, model_parts, optimizers, check)
    return load_trainer_state(ckpt)  # its files were among those checked


def load_trained_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as and load its weights (eval mode).

    LoRA adapters of a fine-tune are merged into their base weights, so the model is
    always the plain family model.

    Runs in this process alone (no process group needed), from a checkpoint saved under
    any layout.
    """
    from baobab import models  # checkpoints describe models; models know nothing of checkpoints
    from baobab.models.common.init import allocate

    ckpt = resolve_checkpoint(path)
    check = LoadCheck(ckpt, distributed=False)  # meta.json checked before it builds a model
    meta = check.meta
    described = meta.get("model")
    if not isinstance(described, dict) or "name" not in described:
        raise ValueError(f"checkpoint '{ckpt}' has no model description in its {META_FILE}")
    cfg = models.get_config(described["name"], **described.get("config", {}))
    model = models.build_model(cfg, device="meta")  # allocated below, never initialised
    lora = meta.get("lora")
    if lora:  # a LoRA fine-tune: load base + adapters as trained, then fold the adapters in
        from baobab.models.lora import LoRAConfig, apply_lora, merge_lora

        apply_lora(model, LoRAConfig(**{**lora, "targets": tuple(lora["targets"])}))
    allocate(model, "cpu")  # DCP writes every stored tensor in place
    _load_into(ckpt, [model], [], check)
    if lora:
        merge_lora(model).requires_grad_(True)
    return model.to(device).eval(), meta
