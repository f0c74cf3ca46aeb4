"""The README's front door: the quickstart runs end to end and is deterministic for a seed."""

from __future__ import annotations

from baobab.commands import quickstart


def test_quickstart_is_deterministic(tmp_path, capsys):
    kwargs = {"data_dir": str(tmp_path / "data"), "seed": 0, "max_steps": 31, "progress": False}
    first = quickstart(run_dir=str(tmp_path / "a"), **kwargs)
    first_out = capsys.readouterr().out
    second = quickstart(run_dir=str(tmp_path / "b"), **kwargs)
    second_out = capsys.readouterr().out
    assert first.losses == second.losses
    assert first.val == second.val
    sample = first_out.split("sample:")[1]
    assert sample == second_out.split("sample:")[1] and sample.strip().startswith("----")
    # validation loss falls from the untrained model's
    assert first.val["val_loss"] < first.losses[0] - 1.0
