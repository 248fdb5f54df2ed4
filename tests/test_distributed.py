"""Data-parallel protect() / evaluate() over torch.distributed (gloo, CPU, 2 spawned processes).

Every test spawns real processes that rendezvous on a free local port: 2-process == 1-process
weights (both engines, float64, tiny MLP), a dead rank makes the other fail fast with a clear
error (and a stuck one within the timeout), resume after a crash continues from the last complete
checkpoint, ``sophon-fast protect --nproc 2`` writes one result, and evaluate() spread over two
ranks gives the single-process report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sophon_fast import cli
from sophon_fast.api import ProtectConfig, ProtectResult, protect
from sophon_fast.distributed import DistributedError, current, launch, rank_and_world
from sophon_fast.models import MLP

WEIGHTS_ATOL = 1e-12  # 2 ranks vs 1 process, float64, after 3 outer steps
SHORT_TIMEOUT_S = 3.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread_fast_start():
    """Tiny tensors: one thread avoids OpenMP spin-waits on the shared cores. Ranks start from
    a fork server that has imported torch (and the torch._dynamo that torch.optim pulls in) and
    this module once, instead of ~4 s of imports per spawned process."""
    import multiprocessing

    import sophon_fast.distributed as sd

    previous = torch.get_num_threads(), sd.START_METHOD
    torch.set_num_threads(1)
    multiprocessing.set_forkserver_preload(["torch._dynamo", __name__])
    sd.START_METHOD = "forkserver"
    yield
    torch.set_num_threads(previous[0])
    sd.START_METHOD = previous[1]


def tiny_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=16, hidden=(8,), num_classes=3).double()


def domains(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    original = (torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g))
    restricted = (torch.rand(30, 1, 4, 4, generator=g), torch.randint(0, 3, (30,), generator=g))
    return original, restricted


def tiny_config(**overrides) -> ProtectConfig:
    base = dict(
        dtype="float64",
        inner_steps=3,
        batch_size=9,  # odd: the NTR shards are 5 and 4 rows
        adapt_size=6,
        outer_steps=3,
        base_lr=1e-2,
        guard_threshold=None,
        simulations=2,
        adversaries=(("sgd", 0.1), ("adam", 1e-2)),
    )
    base.update(overrides)
    return ProtectConfig(**base)


def run_protect(config: ProtectConfig, **kwargs) -> ProtectResult:
    original, restricted = domains()
    return protect(tiny_mlp(), original, restricted, config, progress=False, **kwargs)


def run_generation() -> ProtectResult:
    """Generation mode: a tiny noise predictor (GroupNorm, no running statistics), two
    simulations per meta step (one per rank: each rank draws the other's noise and drops it)
    and an odd NTR batch (shards of 4 and 3 rows, the noise drawn for all 7 on both ranks)."""
    g = torch.Generator().manual_seed(3)
    original, restricted = (torch.rand(n, 1, 4, 4, generator=g) * 2 - 1 for n in (16, 12))
    config = ProtectConfig(
        mode="generation", loss="mse_ascent", dtype="float64", inner_steps=2, batch_size=7,
        adapt_size=4, outer_steps=2, base_lr=1e-2, inner_lr=1e-2, timesteps="0:999",
        eval_size=6, simulations=2,
    )  # fmt: skip
    return protect(tiny_unet(), original, restricted, config, progress=False)


def tiny_unet() -> torch.nn.Module:
    from sophon_fast.models.unet import SmallUNet

    torch.manual_seed(0)
    return SmallUNet(in_channels=1, image_size=4, base_channels=4, channel_mults=(1,), groups=2)


def max_difference(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------- rank bodies (spawned)


def tiny_bn_cnn() -> torch.nn.Module:
    from sophon_fast.models import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(num_classes=3, in_channels=1, image_size=4, widths=(2, 3)).double()


def _shared_rank(out: str) -> None:
    """Equivalence runs (both engines), an idle rank, BatchNorm and an evaluation, in one
    2-process launch."""
    import warnings

    rank, world = rank_and_world()
    assert world == 2 and current() is not None
    results = {}
    for engine, sampling in (("fast", "one"), ("reference", "all")):
        result = run_protect(tiny_config(engine=engine, adversary_sampling=sampling))
        results[engine] = {"state": result.model.state_dict(), "history": result.history}
    with warnings.catch_warnings(record=True) as caught:  # one unit per step: rank 1 idles
        warnings.simplefilter("always")
        results["idle"] = {"state": run_protect(tiny_config(simulations=1)).model.state_dict()}
    results["idle"]["warnings"] = [str(w.message) for w in caught]
    original, restricted = domains()
    for engine in ("fast", "reference"):
        bn = protect(
            tiny_bn_cnn(), original, restricted, tiny_config(engine=engine), progress=False
        )
        results[f"bn_{engine}"] = {"state": bn.model.state_dict()}
    generation = run_generation()
    results["generation"] = {"state": generation.model.state_dict(), "history": generation.history}
    report = _tiny_evaluate(Path(out) / "report")
    torch.save(results, Path(out) / f"rank{rank}.pt")
    if rank == 0:
        (Path(out) / "report.json").write_text(json.dumps(report.data))


def _failing_rank(out: str, mode: str, fail_at: int) -> None:
    """Rank 1 dies ("exit") or stops answering ("stuck") after outer step ``fail_at``; rank 0
    records the error it raises and when."""
    rank, _ = rank_and_world()
    out = Path(out)

    def fail(record):
        if rank == 1 and record["step"] == fail_at:
            (out / "failed_at").write_text(repr(time.time()))
            if mode == "exit":
                os._exit(0)  # a clean exit code: the launcher waits for rank 0's own error
            time.sleep(120)

    try:
        run_protect(
            tiny_config(outer_steps=5, checkpoint_every=1),
            checkpoint_dir=out / "checkpoints",
            callbacks=[fail],
        )
    except DistributedError as error:
        (out / "rank0.json").write_text(json.dumps({"error": str(error), "at": time.time()}))
        raise


def _resuming_rank(checkpoint_dir: str, out: str) -> None:
    ran = []  # the outer steps this process runs: a resume that ignored the checkpoint runs 1-5
    result = run_protect(
        tiny_config(outer_steps=5, checkpoint_every=1),
        checkpoint_dir=checkpoint_dir,
        resume=True,
        callbacks=[lambda record: ran.append(record["step"])],
    )
    if rank_and_world()[0] == 0:
        torch.save({"state": result.model.state_dict(), "history": result.history, "ran": ran}, out)


def _tiny_evaluate(report_dir=None):
    from sophon_fast.attacks import evaluate

    g = torch.Generator().manual_seed(5)
    train = (torch.rand(24, 1, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g))
    test = (torch.rand(9, 1, 4, 4, generator=g), torch.randint(0, 3, (9,), generator=g))
    grid = {
        "sweep": [
            {"scope": ["full", "head_only"], "optimizer": "adam", "lr": 1e-2, "batch_size": 8},
            {"scope": "reinit_head_full", "optimizer": "momentum", "lr": 1e-1, "batch_size": 8},
        ],
        "seeds": [0, 1],
        "search": {"trials": 0},
        "benign": None,
    }
    return evaluate(
        tiny_mlp(0).float(),
        (train, test),
        original=test,
        normal=tiny_mlp(1).float(),
        attacks=grid,
        epochs=1,
        report_dir=report_dir,
    )


def _without_timing(data):
    if isinstance(data, dict):
        return {k: _without_timing(v) for k, v in data.items() if k not in ("seconds", "workers")}
    if isinstance(data, list):
        return [_without_timing(v) for v in data]
    return data


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def shared_launch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    launch(_shared_rank, 2, (str(out),), timeout_s=60)
    return out


def failed_launch(out: Path, mode: str) -> tuple[str, dict, float]:
    with pytest.raises(DistributedError) as info:
        launch(_failing_rank, 2, (str(out), mode, 3), timeout_s=SHORT_TIMEOUT_S)
    rank0 = json.loads((out / "rank0.json").read_text())
    return str(info.value), rank0, rank0["at"] - float((out / "failed_at").read_text())


@pytest.fixture(scope="module")
def crashed_launch(tmp_path_factory) -> tuple[Path, str, dict, float]:
    out = tmp_path_factory.mktemp("crash")
    return (out, *failed_launch(out, "exit"))


def test_two_processes_give_the_single_process_weights(shared_launch):
    ranks = torch.load(shared_launch / "rank0.pt")
    for engine, sampling in (("fast", "one"), ("reference", "all")):
        single = run_protect(tiny_config(engine=engine, adversary_sampling=sampling))
        state = single.model.state_dict()
        moved = max_difference(state, tiny_mlp().state_dict())
        assert moved > 1e-3, "the run must change the weights for the comparison to mean anything"
        assert max_difference(ranks[engine]["state"], state) <= WEIGHTS_ATOL, engine
        two, one = ranks[engine]["history"], single.history
        assert [r["adversaries"] for r in two] == [r["adversaries"] for r in one]
        for key in ("suppression_loss", "restricted_accuracy", "ntr_loss", "original_accuracy"):
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-12), key
    # the comparison can fail: one simulation per step is a different run ...
    other = run_protect(tiny_config(simulations=1)).model.state_dict()
    assert max_difference(ranks["fast"]["state"], other) > 1e-6
    # ... which two ranks also reproduce, one of them idle (and saying so)
    assert max_difference(ranks["idle"]["state"], other) <= WEIGHTS_ATOL
    idle = torch.load(shared_launch / "rank1.pt")["idle"]["warnings"]
    assert any("rank 1 is idle" in w and "multiple of 2" in w for w in idle), idle
    assert not any("idle" in w for w in ranks["idle"]["warnings"])


def test_generation_on_two_processes_gives_the_single_process_weights(shared_launch):
    ranks = [torch.load(shared_launch / f"rank{r}.pt")["generation"] for r in (0, 1)]
    single = run_generation()
    assert max_difference(ranks[0]["state"], ranks[1]["state"]) == 0.0  # one model on all ranks
    assert max_difference(ranks[0]["state"], single.model.state_dict()) <= WEIGHTS_ATOL
    two, one = ranks[0]["history"], single.history
    for key in ("suppression_loss", "restricted_mse", "ntr_loss", "original_mse"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-12), key
    # the comparison means something: the run trained (a rank that did not draw the noise of
    # the unit it skips would have seen other noise from then on)
    assert max_difference(single.model.state_dict(), tiny_unet().double().state_dict()) > 1e-3
    assert all(r["restricted_mse"] > 0 and r["original_mse"] > 0 for r in one)


def test_batchnorm_statistics_agree_across_ranks(shared_launch):
    rank0, rank1 = (torch.load(shared_launch / f"rank{r}.pt") for r in (0, 1))
    start = tiny_bn_cnn().state_dict()
    for engine in ("fast", "reference"):
        a, b = rank0[f"bn_{engine}"]["state"], rank1[f"bn_{engine}"]["state"]
        assert max_difference(a, b) == 0.0, engine  # same weights and statistics on every rank
        stats = [k for k in a if "running" in k]
        assert stats and max(float((a[k] - start[k]).abs().max()) for k in stats) > 1e-3
        assert all(torch.isfinite(a[k]).all() for k in stats)
        assert int(a["features.1.num_batches_tracked"]) == 3  # one NTR forward per outer step


def test_a_dead_rank_makes_the_other_fail_fast_with_a_clear_error(crashed_launch):
    _, message, rank0, delay = crashed_launch
    error = rank0["error"]
    assert "rank 0 of 2" in error and "another rank died" in error and "resume" in error
    assert "at outer step 3" in error or "at outer step 4" in error
    assert 0 <= delay < SHORT_TIMEOUT_S  # gloo notices the closed connection at once
    assert "rank 0 of 2" in message  # the launcher reports rank 0's error


def test_a_stuck_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    message, rank0, delay = failed_launch(tmp_path, "stuck")
    assert "another rank died or did not reach it within the timeout (3 s)" in rank0["error"]
    assert "Timed out" in rank0["error"]  # gloo's own timeout fired, not a closed connection
    assert 0 <= delay < SHORT_TIMEOUT_S + 10
    assert "rank 0 of 2" in message


def test_resume_after_a_crash_continues_from_the_last_complete_checkpoint(crashed_launch):
    out = crashed_launch[0]
    checkpoint_dir = out / "checkpoints"
    meta = json.loads((checkpoint_dir / "checkpoint.json").read_text())
    assert meta["step"] == 2  # step 3 never completed on every rank
    resumed_path = out / "resumed.pt"
    launch(_resuming_rank, 2, (str(checkpoint_dir), str(resumed_path)), timeout_s=60)
    resumed = torch.load(resumed_path)
    single = run_protect(tiny_config(outer_steps=5))
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4, 5]
    assert resumed["ran"] == [3, 4, 5]  # steps 1 and 2 came from the checkpoint
    assert max_difference(resumed["state"], single.model.state_dict()) <= WEIGHTS_ATOL


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """A tiny protect TOML: the MLP's weights and both domains as .npz files."""
    folder = tmp_path_factory.mktemp("cli")
    original, restricted = domains()
    for name, (x, y) in (("original", original), ("restricted", restricted)):
        np.savez(folder / f"{name}.npz", x=x.numpy(), y=y.numpy())
    ProtectResult(model=tiny_mlp().float(), history=[], config=ProtectConfig()).save(
        folder / "pretrained"
    )
    config = folder / "small.toml"
    config.write_text(
        f"""
[model]
name = "mlp"
kwargs = {{ in_features = 16, hidden = [8], num_classes = 3 }}
weights = "{folder / "pretrained"}"
[data]
original = {{ format = "npz", path = "{folder / "original.npz"}", num_classes = 3 }}
restricted = {{ format = "npz", path = "{folder / "restricted.npz"}", num_classes = 3 }}
[protect]
outer_steps = 2
inner_steps = 2
batch_size = 8
adapt_size = 5
simulations = 2
guard_threshold = 0.0
"""
    )
    return config


@pytest.fixture(scope="module")
def nproc_result(small_config) -> Path:
    out = small_config.parent / "protected"
    argv = ["protect", "--config", str(small_config), "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--nproc", "2", "--timeout", "60"]) == 0
    return out


def test_cli_protect_nproc_2_writes_one_checkpoint(nproc_result):
    result = ProtectResult.load(nproc_result)
    assert len(result.history) == 2 and result.config.simulations == 2
    assert sorted(p.name for p in (nproc_result / "checkpoints").iterdir()) == [
        "checkpoint.json",
        "checkpoint.safetensors",
    ]
    assert json.loads((nproc_result / "checkpoints" / "checkpoint.json").read_text())["step"] == 2
    assert max_difference(result.model.state_dict(), tiny_mlp().float().state_dict()) > 0


def test_cli_protect_under_torchrun_joins_its_process_group(small_config, nproc_result, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "protected"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "sophon_fast.cli", "protect"]
    command += ["--config", str(small_config), "--out", str(out), "--no-progress"]
    env = {**os.environ, "SOPHON_FAST_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("protected model written to") == 1  # rank 0 only
    torchrun = ProtectResult.load(out).model.state_dict()
    launched = ProtectResult.load(nproc_result).model.state_dict()
    assert max_difference(torchrun, launched) == 0.0  # same world size, same arithmetic


def test_evaluate_spread_over_two_ranks_gives_the_single_process_report(shared_launch):
    two = json.loads((shared_launch / "report.json").read_text())
    one = _tiny_evaluate().data
    assert _without_timing(two) == _without_timing(one)
    assert sum(len(arm["cells"]) for arm in two["arms"].values()) == 3 * 3 * 2
    assert len(list((shared_launch / "report" / "cells").glob("*.json"))) == 18
    assert (shared_launch / "report" / "report.json").is_file()


def test_without_a_process_group_nothing_is_distributed(monkeypatch):
    from sophon_fast import distributed as sd

    assert current() is None and rank_and_world() == (0, 1) and sd.is_main_process()
    assert [u for u in range(7) if sd.owns(u, 1, 3)] == [1, 4]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert sd.init_from_env() is False  # not under torchrun: nothing to join
    with pytest.raises(ValueError, match="nprocs: expected an int >= 1"):
        launch(print, 0)
    with pytest.raises(ValueError, match="timeout: expected a number of seconds > 0"):
        launch(print, 2, timeout_s=-1.0)
    monkeypatch.setenv("SOPHON_FAST_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SOPHON_FAST_DIST_TIMEOUT='soon'"):
        launch(print, 2)
    with pytest.raises(SystemExit, match="--nproc expects an int >= 1"):
        cli.main(["protect", "--config", "missing.toml", "--nproc", "0"])
    with pytest.raises(ValueError, match="ProtectConfig.simulations"):
        ProtectConfig(simulations=0)
    assert "simulations" not in ProtectConfig().to_dict()  # default dicts are unchanged
    assert ProtectConfig(simulations=4).to_dict()["simulations"] == 4
