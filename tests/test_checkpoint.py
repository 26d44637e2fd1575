from pathlib import Path

import pytest
import torch

from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.errors import MetarunError


def test_checkpoint_round_trips_tensors_and_numbers(tmp_path):
    state = {
        "step": 7,
        "weights": torch.arange(6.0).reshape(2, 3),
        "rng": {"g": torch.get_rng_state()},
    }
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7
    assert torch.equal(loaded["weights"], state["weights"])
    assert torch.equal(loaded["rng"]["g"], state["rng"]["g"])


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises)
        save_checkpoint({"step": 2, "unpicklable": lambda: 0}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(MetarunError, match=r"cannot read checkpoint .*delete") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_foreign_checkpoint_is_rejected(tmp_path: Path):
    path = tmp_path / "last.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(MetarunError, match="not a metarun checkpoint"):
        load_checkpoint(path)
