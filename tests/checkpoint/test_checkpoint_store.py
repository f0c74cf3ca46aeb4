"""Single-process DCP checkpoints: exact round trip, keep-last, crash safety, refusal, async."""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from baobab.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    load_trained_model,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    store,
    verify_checkpoint,
    wait_for_checkpoint,
)
from baobab.models import build_model

META = {"model": {"name": "gpt-nano", "family": "gpt", "config": {}}, "objective": "causal_lm"}
# The async writer thread warns under pytest, whose per-test filters replace baobab's.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def trained(seed: int = 0, steps: int = 2):
    """gpt-nano, AdamW and a LambdaLR after ``steps`` updates."""
    torch.manual_seed(seed)
    model = build_model("gpt-nano")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    x = torch.randint(0, 512, (2, 16))
    for _ in range(steps):
        step(model, opt, x)
        sched.step()
    return model, opt, sched, x


def step(model, opt, x):
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def save(run_dir, step_no, model, opt=None, keep_last=3, **kw):
    state = {"step": step_no, "rng": {"torch": torch.get_rng_state()}}
    return save_checkpoint(
        run_dir, step_no, [model], [opt] if opt else [], state, META, keep_last=keep_last, **kw
    )


def assert_same_model(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_round_trip_is_bit_identical(tmp_path):
    model, opt, sched, x = trained()
    trainer_state = {
        "step": 2,
        "scheduler": sched.state_dict(),
        "data": {"epoch": 0, "cursor": 8, "seed": 1},
        "rng": {"torch": torch.get_rng_state()},
    }
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    path = save_checkpoint(
        tmp_path, 2, [model], [opt], trainer_state, META, tokenizer_file=tok, keep_last=2
    )
    assert path.name == "step_00000002" and (path / "tokenizer.json").read_text() == "{}"
    meta = read_meta(path)
    files = meta.pop("checksums")["files"]  # every other file's size and checksum
    assert meta == {**META, "step": 2}
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name != "meta.json")

    other, other_opt, other_sched, _ = trained(seed=1, steps=0)
    loaded = load_checkpoint(tmp_path, [other], [other_opt])
    other_sched.load_state_dict(loaded["scheduler"])
    assert_same_model(model, other)
    assert other.output.weight is other.tok_embeddings.weight  # tied stays tied
    saved_opt, loaded_opt = opt.state_dict(), other_opt.state_dict()
    assert saved_opt["param_groups"] == loaded_opt["param_groups"]
    for pid, tensors in saved_opt["state"].items():
        for name, value in tensors.items():
            torch.testing.assert_close(loaded_opt["state"][pid][name], value, rtol=0, atol=0)
    # JSON values come back with the same types and values, tensors with their dtype.
    assert loaded["scheduler"] == sched.state_dict() == other_sched.state_dict()
    assert [type(v) for v in loaded["scheduler"].values()] == [
        type(v) for v in sched.state_dict().values()
    ]
    assert loaded["data"] == trainer_state["data"]
    assert loaded["rng"]["torch"].dtype == torch.uint8
    assert torch.equal(loaded["rng"]["torch"], trainer_state["rng"]["torch"])
    # The next update is identical too.
    step(model, opt, x)
    step(other, other_opt, x)
    assert_same_model(model, other)


def test_load_trained_model_rebuilds_from_meta(tmp_path):
    model, opt, _, x = trained()
    save(tmp_path, 2, model, opt)
    rebuilt, meta = load_trained_model(tmp_path)
    assert meta["step"] == 2 and not rebuilt.training
    assert rebuilt.output.weight is rebuilt.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


def test_keep_last_and_latest(tmp_path):
    model = build_model("gpt-nano")
    for step_no in (1, 2, 3, 4):
        save(tmp_path, step_no, model, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_checkpoint(tmp_path) == latest_checkpoint(tmp_path)
    assert read_meta(tmp_path)["step"] == 4
    save(tmp_path, 4, model, keep_last=1)  # re-saving a step replaces it
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000004"]
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        save(tmp_path, 5, model, keep_last=0)


def test_a_crashed_save_is_ignored_and_swept(tmp_path, monkeypatch):
    model = build_model("gpt-nano")
    good = save(tmp_path, 5, model)
    root = tmp_path / "checkpoints"
    crashed = root / ".tmp-step_00000006"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"half")
    half = root / "step_00000007"  # no meta.json: never completed
    half.mkdir()
    assert latest_checkpoint(tmp_path) == good

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.dcp, "save", fail)  # a crash in the middle of writing shards
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 8, model)
    assert checkpoint_dirs(tmp_path) == [good]
    load_checkpoint(tmp_path, [build_model("gpt-nano")], [])  # the previous one still loads
    monkeypatch.undo()
    save(tmp_path, 9, model)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000009"]


def test_mismatched_model_is_refused_in_one_sentence(tmp_path):
    save(tmp_path, 1, build_model("gpt-nano"))
    for other, detail in [
        (build_model("gpt-nano", d_model=32), "'tok_embeddings.weight' is [512, 64] there"),
        (build_model("gpt-nano", n_layer=3), "it lacks 'layers.2."),
        (build_model("gpt-nano", n_layer=1), "it has 'layers.1."),
    ]:
        with pytest.raises(ValueError, match="does not match the model") as err:
            load_checkpoint(tmp_path, [other], [])
        assert detail in str(err.value) and "\n" not in str(err.value)
    model = build_model("gpt-nano")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="does not match the optimizer: it lacks 'state."):
        load_checkpoint(tmp_path, [model], [sgd])  # saved without optimizer state


def test_resolve_refuses_a_plain_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint nor a run directory"):
        resolve_checkpoint(tmp_path)


def test_async_save_is_published_only_once_complete(tmp_path, monkeypatch):
    model, opt, _, _ = trained()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    gate = threading.Event()
    real_async_save = store.dcp.async_save

    def gated_async_save(*args, **kwargs):  # the background write ends only when the gate opens
        inner, outer = real_async_save(*args, **kwargs), Future()

        def finish():
            gate.wait(60)
            outer.set_result(inner.result())

        threading.Thread(target=finish, daemon=True).start()
        return outer

    monkeypatch.setattr(store.dcp, "async_save", gated_async_save)
    final = save(tmp_path, 3, model, opt, async_save=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on: the snapshot was staged before returning
    waiter = threading.Thread(target=wait_for_checkpoint)
    waiter.start()
    time.sleep(0.3)
    assert not final.exists() and checkpoint_dirs(tmp_path) == []
    gate.set()
    waiter.join(60)
    assert final.is_dir() and latest_checkpoint(tmp_path) == final
    assert {"__0_0.distcp", ".metadata"} <= read_meta(final)["checksums"]["files"].keys()
    assert verify_checkpoint(final) is None  # hashed by the background writer too
    rebuilt, _ = load_trained_model(final)
    for name, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_the_next_save_completes_a_pending_async_one(tmp_path):
    model, opt, _, _ = trained()
    save(tmp_path, 1, model, opt, async_save=True)
    save(tmp_path, 2, model, opt)  # waits for step 1 first
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000001", "step_00000002"]
    assert wait_for_checkpoint() is None


def stages(model):
    """Two pipeline stages of an untied gpt-nano, as a pipeline split leaves them."""
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["1"]
    first.norm = first.output = None
    del second.layers["0"]
    second.tok_embeddings = None
    return [first, second]


def test_pipeline_stages_save_and_load_their_own_names(tmp_path):
    torch.manual_seed(0)
    full = build_model("gpt-nano", tie_embeddings=False)
    opt = torch.optim.AdamW(full.parameters(), lr=1e-2)
    step(full, opt, torch.randint(0, 512, (2, 8)))
    save(tmp_path / "full", 1, full, opt)

    parts = stages(build_model("gpt-nano", tie_embeddings=False))
    part_opts = [torch.optim.AdamW(p.parameters(), lr=1e-2) for p in parts]
    load_checkpoint(tmp_path / "full", parts, part_opts)
    full_params = dict(full.named_parameters())
    for part, part_opt in zip(parts, part_opts):
        for name, param in part.named_parameters():
            torch.testing.assert_close(param, full_params[name], rtol=0, atol=0, msg=name)
            exp_avg = opt.state[full_params[name]]["exp_avg"]
            torch.testing.assert_close(part_opt.state[param]["exp_avg"], exp_avg, rtol=0, atol=0)

    state = {"step": 1}
    save_checkpoint(tmp_path / "parts", 1, parts, part_opts, state, META)  # merged by FQN
    again = build_model("gpt-nano", tie_embeddings=False)
    again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "parts", [again], [again_opt])
    assert_same_model(full, again)
    assert again_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="one optimizer per model part or none"):
        load_checkpoint(tmp_path / "parts", parts, part_opts[:1])
