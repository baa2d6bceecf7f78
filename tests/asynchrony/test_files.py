"""yellowfin/files.py: every file the package writes is written atomically (checkpoints, bench results)."""

import pytest
import torch

from yellowfin.files import atomic_write, load_checkpoint_file, save_checkpoint_file


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, lambda f: f.write("old"), text=True)

    def fails_half_way(f):
        f.write("new and half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fails_half_way, text=True)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_checkpoint_round_trips_and_a_non_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "nested" / "checkpoint.pt")
    assert save_checkpoint_file({"version": 3, "x": torch.arange(4)}, path) == path
    state = load_checkpoint_file(path)
    assert state["version"] == 3 and torch.equal(state["x"], torch.arange(4))
    torch.save([1, 2], str(tmp_path / "list.pt"))
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint_file(str(tmp_path / "list.pt"))
