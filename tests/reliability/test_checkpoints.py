"""Crash-consistent checkpoints: a protect() process killed at any write point of a checkpoint,
or by ``kill -9`` at a random instant, resumes to the bit-identical result of an uninterrupted run.

At fdbb492 checkpoint.safetensors was replaced before checkpoint.json: a death between the two
renames left a pair from two steps that resume refused ("inconsistent"), with no older copy (5 of
20 random kill -9 of ``sophon-fast protect``). Now one rename of checkpoint.safetensors, whose
header carries the JSON, commits a checkpoint; the deaths are injected through
``sophon_fast.engine.checkpoint.write_point_hook`` in a child process that ends with ``os._exit``
(no cleanup runs, as after SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sophon_fast.api import protect
from sophon_fast.engine import checkpoint as checkpoints

# The run every test uses: a tiny CNN, float64, one thread (bits equal across processes).
SETUP = """
import torch
from sophon_fast.api import ProtectConfig
from sophon_fast.models import SmallCNN
torch.set_num_threads(1)

def make(outer_steps, **overrides):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, in_channels=1, image_size=8, widths=(3, 4))
    g = torch.Generator().manual_seed(0)
    original = (torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    restricted = (torch.randn(30, 1, 8, 8, generator=g) + 0.5, torch.randint(0, 3, (30,), generator=g))
    config = dict(dtype="float64", inner_steps=3, batch_size=8, adapt_size=5, base_lr=1e-2,
                  guard_threshold=None, outer_steps=outer_steps, checkpoint_every=1,
                  adversaries=(("adam", 0.01), ("momentum", 0.1)))
    config.update(overrides)
    return model, original, restricted, ProtectConfig(**config)
"""

CHILD = """
import os, sys
from pathlib import Path
from sophon_fast.api import protect
from sophon_fast.engine import checkpoint as checkpoints
{setup}
directory, point, occurrence, outer_steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen = {{"n": 0}}

def die(name, path):
    if name != point:
        return
    seen["n"] += 1
    if seen["n"] == occurrence:
        if name.endswith("_written"):  # a torn temporary file, as a kill mid-write leaves it
            size = path.stat().st_size
            with open(path, "r+b") as handle:
                handle.truncate(size // 2)
        os._exit(137)

if point != "none":
    checkpoints.write_point_hook = die
model, original, restricted, config = make(outer_steps)
protect(model, original, restricted, config, checkpoint_dir=directory, progress=False)
"""

POINTS = (
    "begin",
    "tensors_written",
    "tensors_synced",
    "committed",
    "json_written",
    "json_synced",
    "done",
)
OUTER_STEPS = 4
KILLED_AT = 3  # the third checkpoint: two complete ones are on disk before it


def _namespace():
    space: dict = {}
    exec(SETUP, space)
    return space


@pytest.fixture(scope="module")
def straight():
    """The uninterrupted run (in this process: one thread, as the child)."""
    previous = torch.get_num_threads()
    space = _namespace()
    try:
        model, original, restricted, config = space["make"](OUTER_STEPS)
        result = protect(model, original, restricted, config, progress=False)
    finally:
        torch.set_num_threads(previous)
    return result


def _child(directory: Path, point: str, occurrence: int, outer_steps: int = OUTER_STEPS):
    script = CHILD.format(setup=SETUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(directory), point, str(occurrence), str(outer_steps)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _resume_and_compare(directory: Path, straight, outer_steps: int = OUTER_STEPS) -> None:
    previous = torch.get_num_threads()
    space = _namespace()
    try:
        model, original, restricted, config = space["make"](outer_steps)
        resumed = protect(
            model, original, restricted, config, checkpoint_dir=directory, resume=True,
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    # the resumed run's own checkpoint writes removed whatever the killed writer left behind
    assert sorted(p.name for p in directory.iterdir()) == [
        checkpoints.CHECKPOINT_JSON,
        checkpoints.CHECKPOINT_TENSORS,
    ]


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_every_write_point_resumes_bit_identically(tmp_path, straight, point):
    child = _child(tmp_path, point, KILLED_AT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 137, err[-2000:]
    # before the rename of checkpoint.safetensors the previous checkpoint is the one on disk,
    # from the rename on the new one: never a mix, never nothing
    committed = POINTS.index(point) >= POINTS.index("committed")
    _, meta = checkpoints.load_checkpoint(tmp_path)
    assert meta["step"] == (KILLED_AT if committed else KILLED_AT - 1)
    _resume_and_compare(tmp_path, straight)


def test_random_kill_9_resumes_bit_identically(tmp_path, straight):
    """Real SIGKILL at random instants of a 30-step run that checkpoints every step."""
    steps = 30
    space = _namespace()
    previous = torch.get_num_threads()
    try:
        model, original, restricted, config = space["make"](steps)
        long_run = protect(model, original, restricted, config, progress=False)
    finally:
        torch.set_num_threads(previous)
    rng = random.Random(17)
    for trial in range(3):
        directory = tmp_path / f"trial{trial}"
        child = _child(directory, "none", 0, steps)
        deadline = time.monotonic() + 120
        while not (directory / checkpoints.CHECKPOINT_TENSORS).exists():
            assert child.poll() is None, child.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        child.kill()  # SIGKILL
        child.communicate(timeout=60)
        _resume_and_compare(directory, long_run, steps)


def test_the_json_copy_is_a_copy_and_old_checkpoints_still_load(tmp_path):
    tensors = {"engine.model.params": torch.arange(4.0)}
    checkpoints.save_checkpoint(tmp_path, tensors, {"step": 1, "history": []})
    checkpoints.save_checkpoint(tmp_path, tensors, {"step": 2, "history": [1]})
    copy = json.loads((tmp_path / checkpoints.CHECKPOINT_JSON).read_text())
    assert copy == {"step": 2, "history": [1]}
    # a missing copy is fine: the header is the checkpoint
    (tmp_path / checkpoints.CHECKPOINT_JSON).unlink()
    assert checkpoints.load_checkpoint(tmp_path)[1]["step"] == 2
    # the earlier two-file format (JSON only beside the tensors) still resumes
    old = tmp_path / "old"
    checkpoints.atomic_save_tensors(old / checkpoints.CHECKPOINT_TENSORS, tensors, {"step": "5"})
    checkpoints.atomic_write_text(old / checkpoints.CHECKPOINT_JSON, json.dumps({"step": 5}))
    loaded, meta = checkpoints.load_checkpoint(old)
    assert meta == {"step": 5} and torch.equal(
        loaded["engine.model.params"], tensors["engine.model.params"]
    )
    checkpoints.atomic_write_text(old / checkpoints.CHECKPOINT_JSON, json.dumps({"step": 4}))
    with pytest.raises(ValueError, match="inconsistent"):
        checkpoints.load_checkpoint(old)


def test_stale_temporaries_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".checkpoint.safetensors.abc123.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"torn")
    checkpoints.save_checkpoint(tmp_path, {"x": torch.zeros(1)}, {"step": 1})
    assert not stale.exists()


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """An exception (disk full, say) at any point before the commit leaves the previous one."""
    tensors = {"x": torch.zeros(3)}
    checkpoints.save_checkpoint(tmp_path, tensors, {"step": 1})

    def fail(point, path):
        if point == "tensors_synced":
            raise OSError(28, "No space left on device")

    checkpoints.write_point_hook = fail
    try:
        with pytest.raises(OSError, match="No space"):
            checkpoints.save_checkpoint(tmp_path, {"x": torch.ones(3)}, {"step": 2})
    finally:
        checkpoints.write_point_hook = None
    loaded, meta = checkpoints.load_checkpoint(tmp_path)
    assert meta["step"] == 1 and torch.equal(loaded["x"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        checkpoints.CHECKPOINT_JSON,
        checkpoints.CHECKPOINT_TENSORS,
    ]


def test_a_checkpoint_of_the_earlier_format_resumes_with_a_warning(tmp_path, straight):
    """Written as fdbb492 wrote it (JSON beside the tensors, no data fingerprints, no last-good
    step): resume reads it, warns that the data cannot be checked, and ends bit-identical."""
    space = _namespace()
    previous = torch.get_num_threads()
    try:
        model, original, restricted, config = space["make"](2)
        protect(model, original, restricted, config, checkpoint_dir=tmp_path, progress=False)
    finally:
        torch.set_num_threads(previous)
    tensors, meta = checkpoints.load_checkpoint(tmp_path)
    for key in ("data", "good_step", "events"):
        del meta[key]
    (tmp_path / checkpoints.CHECKPOINT_TENSORS).unlink()
    checkpoints.atomic_save_tensors(
        tmp_path / checkpoints.CHECKPOINT_TENSORS, tensors, metadata={"step": str(meta["step"])}
    )
    checkpoints.atomic_write_text(tmp_path / checkpoints.CHECKPOINT_JSON, json.dumps(meta))
    with pytest.warns(UserWarning, match="predates data fingerprints"):
        _resume_and_compare(tmp_path, straight)
