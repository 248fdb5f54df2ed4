"""Generation mode: config, both engines' equivalence in float64 (simulate() meta-gradients and
weights after outer steps, order 1 and 2, mse_ascent and dos), resume, bad inputs."""

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from sophon_fast.api import ProtectConfig, protect, simulate
from sophon_fast.diffusion import NoiseSchedule
from sophon_fast.engine.generation import NoiseDraws, NoisePredictor, resolve_timesteps
from sophon_fast.models.unet import SmallUNet

META_GRAD_RTOL = 1e-13  # fast vs reference, float64: 1.5e-15 measured (max of 272), 67x margin
WEIGHTS_ATOL = 1e-8  # fast vs reference after 3 outer steps, float64: 1.2e-10 measured, 86x margin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP spin-waits on shared cores cost ~100x
    yield
    torch.set_num_threads(previous)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return SmallUNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)


def images(n, seed, shift=0.0, size=8, channels=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * 2 - 1 + shift).clamp(-1, 1)


def gen_config(**overrides):
    base = dict(
        mode="generation",
        loss="mse_ascent",
        dtype="float64",
        inner_steps=3,
        batch_size=6,
        adapt_size=4,
        outer_steps=3,
        base_lr=1e-2,
        inner_lr=1e-2,
        timesteps="0:999",
        eval_size=8,
    )
    base.update(overrides)
    return ProtectConfig(**base)


def assert_close_states(a, b, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert float((sa[name] - sb[name]).abs().max()) <= atol, name


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------- config


def test_timesteps_resolve_to_0_based_indices():
    assert resolve_timesteps(None, 1000) == [1]  # the official randint(1, 2)
    assert resolve_timesteps(7, 1000) == [7]
    assert resolve_timesteps("3:5", 1000) == [3, 4, 5]
    assert resolve_timesteps("all", 10) == list(range(10))
    assert resolve_timesteps([5, 2, 5], 10) == [2, 5]
    for bad, match in [(10, r"\[0, 9\]"), ("5:3", "empty"), ("x", "expected"), ([], "non-empty")]:
        with pytest.raises(ValueError, match=match):
            resolve_timesteps(bad, 10)
    with pytest.raises(TypeError):
        resolve_timesteps(1.5, 10)


def test_default_timestep_is_the_official_noise_level():
    task = NoiseDraws.from_config(ProtectConfig(mode="generation", loss="dos"))
    x0, noise = (
        torch.zeros(2, 1, 4, 4, dtype=torch.float64),
        torch.ones(2, 1, 4, 4, dtype=torch.float64),
    )
    t = task.timesteps[:1].expand(2)
    packed = task.pack(x0, t, noise)
    # linear 1e-4..0.02 over 1000 steps at index 1: sqrt(1 - (1 - b0)(1 - b1)) = 0.0148
    assert math.isclose(float(packed[0, 0, 0, 0]), 0.01483, rel_tol=1e-3)
    assert torch.equal(packed[:, -1], torch.ones(2, 4, 4, dtype=torch.float64))  # t channel


def test_packed_input_is_the_schedules_q_sample():
    schedule = NoiseSchedule(kind="cosine", timesteps=50)
    task = NoiseDraws(schedule.alpha_bars, range(50))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t, noise = task.draw(x0, g)
    packed = task.pack(x0, t, noise)
    torch.testing.assert_close(
        packed[:, :-1], schedule.q_sample(x0, t, noise), rtol=1e-15, atol=1e-15
    )
    assert torch.equal(packed[:, -1, 0, 0].long(), t)


def test_generation_config_validation():
    with pytest.raises(ValueError, match="mode='generation' takes one of"):
        ProtectConfig(mode="generation")  # default loss "ice" is a classification loss
    with pytest.raises(ValueError, match="expected one of"):
        ProtectConfig(loss="mse_ascent")  # a generation loss in classification mode
    with pytest.raises(ValueError, match="no classification head"):
        ProtectConfig(mode="generation", loss="dos", reinit_head=True)
    with pytest.raises(ValueError, match="generation-mode option"):
        ProtectConfig(timesteps="all")
    with pytest.raises(ValueError, match="mode"):
        ProtectConfig(mode="diffusion")
    with pytest.raises(ValueError, match="guard"):
        ProtectConfig(mode="generation", loss="dos", guard_threshold=50.0)
    with pytest.raises(ValueError, match="0-based"):
        ProtectConfig(mode="generation", loss="dos", timesteps=1000)
    with pytest.raises(ValueError, match="engine_options"):  # one noise draw per replay
        ProtectConfig(mode="generation", loss="dos", engine_options={"cuda_graphs": "inner"})
    with pytest.raises(ValueError, match="engine_options"):  # one noise draw per adversary
        ProtectConfig(mode="generation", loss="dos", engine_options={"vmap_adversaries": True})
    assert "mode" not in ProtectConfig().to_dict()  # classification dicts are unchanged
    config = ProtectConfig(mode="generation", loss="dos", timesteps=(3, 4))
    assert ProtectConfig.from_dict(config.to_dict()) == config
    assert not config.reinit_head_resolved


# ---------------------------------------------------------------- engines agree (float64)


def simulation_draw(k=3, batch=6, adapt=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches, adapt_masks, eval_masks = [], [], []
    for i in range(k):
        x0 = images(batch, seed + i, shift=0.3).double()
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        t = torch.randint(0, 1000, (batch,), generator=g)
        batches.append((x0, noise, t))
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[torch.randperm(batch, generator=g)[:adapt]] = True
        adapt_masks.append(mask)
        eval_masks.append(~mask)
    return batches, adapt_masks, eval_masks


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("loss", ["mse_ascent", "dos"])
def test_engines_give_the_same_meta_gradient(order, loss):
    model = tiny_unet().double()
    batches, adapt_masks, eval_masks = simulation_draw()
    config = gen_config(order=order, loss=loss)
    results = {
        engine: simulate(
            model, batches, adapt_masks, eval_masks, config, adversary=("sgd", 0.05), engine=engine
        )
        for engine in ("fast", "reference")
    }
    fast, ref = results["fast"], results["reference"]
    names = [n for n, _ in model.named_parameters()]
    assert list(fast.meta_grad) == names and list(ref.meta_grad) == names
    for name in names:
        assert rel_err(fast.meta_grad[name], ref.meta_grad[name]) <= META_GRAD_RTOL, name
    assert math.isclose(float(fast.loss), float(ref.loss), rel_tol=1e-12)
    assert math.isclose(float(fast.accuracy), float(ref.accuracy), rel_tol=1e-12)
    # the recorded MSE is the denoising error; mse_ascent is its negation on the same samples
    assert float(fast.accuracy) > 0
    if loss == "mse_ascent":
        assert math.isclose(float(fast.loss), -float(fast.accuracy), rel_tol=1e-12)


def test_order2_differs_from_order1():
    """Order 2 differentiates through the inner updates: the test above could not pass by
    ignoring ``order``."""
    model = tiny_unet().double()
    batches, adapt_masks, eval_masks = simulation_draw()
    grads = [
        simulate(
            model, batches, adapt_masks, eval_masks, gen_config(order=o), adversary=("sgd", 0.5)
        ).meta_grad
        for o in (1, 2)
    ]
    flat = [torch.cat([g[n].reshape(-1) for n in g]) for g in grads]
    assert rel_err(flat[0], flat[1]) > 1e-6


@pytest.mark.parametrize(
    "order, loss, adversary",
    [
        (1, "mse_ascent", ("sgd", 0.05)),
        (1, "dos", ("adam", 0.01)),
        (2, "mse_ascent", ("sgd", 0.05)),
        (2, "dos", ("momentum", 0.05)),
        (1, "mse_ascent", "all"),  # several adversaries per draw: the fast engine's simulate_many
    ],
)
def test_engines_give_the_same_weights_after_three_outer_steps(order, loss, adversary):
    model = tiny_unet()
    original, restricted = images(20, 0), images(14, 1, shift=0.4)
    extra = (
        dict(adversaries=(("sgd", 0.05), ("adam", 0.01)), adversary_sampling="all")
        if adversary == "all"
        else dict(adversaries=(adversary,))
    )
    results = {
        engine: protect(
            model,
            original,
            restricted,
            gen_config(order=order, loss=loss, engine=engine, **extra),
            progress=False,
        )
        for engine in ("fast", "reference")
    }
    fast, ref = results["fast"], results["reference"]
    assert isinstance(fast.model, type(model)) and not isinstance(fast.model, NoisePredictor)
    assert_close_states(fast.model, ref.model, WEIGHTS_ATOL)
    start = {k: v.double() for k, v in model.state_dict().items()}
    moved = max(float((v - start[k]).abs().max()) for k, v in fast.model.state_dict().items())
    assert moved > 1e-3  # the runs trained, so the comparison means something
    for a, b in zip(fast.history, ref.history):
        assert set(a) >= {"restricted_mse", "original_mse", "suppression_loss", "ntr_loss"}
        for key in ("suppression_loss", "ntr_loss", "restricted_mse", "original_mse"):
            assert math.isclose(a[key], b[key], rel_tol=1e-9), key


def spy_channels_last(monkeypatch) -> list:
    """The fast generation engine's resolved ``channels_last``, once per simulation it runs."""
    from sophon_fast.engine.generation import GenerationFastEngine

    seen = []
    eager = GenerationFastEngine._simulate_eager

    def spy(self, *args, **kwargs):
        seen.append(self.resolved["channels_last"])
        return eager(self, *args, **kwargs)

    monkeypatch.setattr(GenerationFastEngine, "_simulate_eager", spy)
    return seen


def test_fast_engine_options_reach_generation_and_keep_the_reference_weights(monkeypatch):
    """The fast engine's speed options run in generation mode (here the CPU's auto choice for
    order 1: channels_last on the packed input, in the simulations as in NTR) and the fast
    engine still equals the reference in float64."""
    seen = spy_channels_last(monkeypatch)
    model = tiny_unet()
    original, restricted = images(20, 0), images(14, 1, shift=0.4)
    fast = protect(model, original, restricted, gen_config(outer_steps=2), progress=False)
    ref = protect(model, original, restricted, gen_config(outer_steps=2, engine="reference"),
                  progress=False)  # fmt: skip
    assert seen == [True, True]  # one simulation per outer step, each with the option
    assert_close_states(fast.model, ref.model, WEIGHTS_ATOL)
    for a, b in zip(fast.history, ref.history):
        for key in ("suppression_loss", "ntr_loss", "restricted_mse", "original_mse"):
            assert math.isclose(a[key], b[key], rel_tol=1e-9), key


def test_explicit_engine_options_in_generation_keep_the_reference_weights(monkeypatch):
    seen = spy_channels_last(monkeypatch)
    model = tiny_unet()
    original, restricted = images(20, 0), images(14, 1, shift=0.4)
    options = {"channels_last": False, "flush_denormal": False}  # the opposite of auto
    fast = protect(model, original, restricted, gen_config(outer_steps=2, engine_options=options),
                   progress=False)  # fmt: skip
    ref = protect(model, original, restricted, gen_config(outer_steps=2, engine="reference"),
                  progress=False)  # fmt: skip
    assert seen == [False, False] and fast.config.engine_options["channels_last"] is False
    assert_close_states(fast.model, ref.model, WEIGHTS_ATOL)


def test_simulate_builds_the_generation_engine_as_protect_does(monkeypatch):
    """simulate() runs on the engine protect() builds, its (auto) options included."""
    seen = spy_channels_last(monkeypatch)
    model = tiny_unet().double()
    batches, adapt_masks, eval_masks = simulation_draw()
    results = {
        engine: simulate(model, batches, adapt_masks, eval_masks, gen_config(engine=engine),
                         adversary=("sgd", 0.05))
        for engine in ("fast", "reference")
    }  # fmt: skip
    assert seen == [True]
    fast, ref = results["fast"], results["reference"]
    for name in fast.meta_grad:
        assert rel_err(fast.meta_grad[name], ref.meta_grad[name]) <= META_GRAD_RTOL, name


def test_result_saves_and_loads_the_initial_mse_and_history(tmp_path):
    model = tiny_unet()
    config = gen_config(outer_steps=1, dtype="float32", loss="dos")
    result = protect(model, images(20, 0), images(14, 1, shift=0.4), config, progress=False)
    assert result.metric == "mse" and result.initial_original_accuracy is None
    assert result.initial_original_mse is not None and result.initial_original_mse > 0
    assert result.initial_original_metric == result.initial_original_mse
    (record,) = result.history
    assert "restricted_accuracy" not in record and "original_accuracy" not in record
    loaded = type(result).load(result.save(tmp_path / "saved"), model=tiny_unet())
    assert loaded.initial_original_mse == result.initial_original_mse
    assert loaded.history == result.history and loaded.events == []
    # a result saved before the MSE had its own field still loads (as None)
    meta_path = tmp_path / "saved" / "result.json"
    meta = json.loads(meta_path.read_text())
    del meta["initial_original_mse"]
    meta_path.write_text(json.dumps(meta))
    assert type(result).load(tmp_path / "saved", model=tiny_unet()).initial_original_mse is None


def test_resume_is_bit_identical_and_caller_model_untouched(tmp_path):
    model = tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original, restricted = images(20, 0), images(14, 1, shift=0.4)
    config = gen_config(outer_steps=4, dtype="float32", loss="dos")
    straight = protect(model, original, restricted, config, progress=False)
    half = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 2})
    protect(model, original, restricted, half, checkpoint_dir=tmp_path, progress=False)
    resumed = protect(
        model, original, restricted, config, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_resume_reads_the_checkpoint(tmp_path):
    """The test above passes even if resume ignored the checkpoint (runs are deterministic). The
    checkpoint here comes from another model (seed 1) than the one passed when resuming (seed 0):
    only a resume that reads it reproduces the seed-1 run, running steps 3 and 4 only."""
    original, restricted = images(20, 0), images(14, 1, shift=0.4)
    config = gen_config(outer_steps=4, dtype="float32", loss="dos")
    straight = protect(tiny_unet(seed=1), original, restricted, config, progress=False)
    half = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 2})
    protect(tiny_unet(seed=1), original, restricted, half, checkpoint_dir=tmp_path, progress=False)
    ran = []
    resumed = protect(
        tiny_unet(seed=0), original, restricted, config, checkpoint_dir=tmp_path, resume=True,
        progress=False, callbacks=[lambda record: ran.append(record["step"])],
    )  # fmt: skip
    assert ran == [3, 4]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_are_rejected_before_training():
    model = tiny_unet()
    original, restricted = images(20, 0), images(14, 1)
    config = gen_config(outer_steps=1)
    with pytest.raises(ValueError, match="channel"):
        protect(model, images(20, 0, channels=3), restricted, config, progress=False)
    with pytest.raises(ValueError, match="not divisible by the model's downsampling 2"):
        protect(model, images(20, 0, size=9), images(14, 1, size=9), config, progress=False)
    with pytest.raises(ValueError, match="built for image_size=8"):
        protect(model, images(20, 0, size=12), images(14, 1, size=12), config, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        protect(model, original, restricted[:5], config, progress=False)
    with pytest.raises(ValueError, match=r"\(N, channels, height, width\)"):
        protect(model, original.flatten(1), restricted, config, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        protect(model, original, restricted.clone().fill_(float("nan")), config, progress=False)
    with pytest.raises(ValueError, match="mode='generation' takes one of"):
        protect(model, original, restricted, gen_config(loss="klu"), progress=False)
    batches, adapt_masks, eval_masks = simulation_draw()
    with pytest.raises(ValueError, match=r"\(x0, noise, t\) triple"):
        simulate(model.double(), [b[:2] for b in batches], adapt_masks, eval_masks, config)


# ---------------------------------------------------------------- attacks, PNG, evaluate()


def _read_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3}[colour]
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()  # filter type 0
    return (
        rows[:, 1:].reshape(height, width, channels).squeeze(-1)
        if channels == 1
        else rows[:, 1:].reshape(height, width, 3)
    )


def test_png_writer_round_trips(tmp_path):
    from sophon_fast.attacks.generation import image_grid, write_png

    rng = np.random.default_rng(0)
    for shape in [(7, 5), (4, 9, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(_read_png(write_png(tmp_path / "a.png", pixels).read_bytes()), pixels)
    grid = image_grid(torch.rand(5, 1, 3, 3), columns=2, pad=1, scale=1)
    assert grid.shape == (3 * 4 + 1, 2 * 4 + 1) and grid[0, 0] == 255


def test_evaluate_generation_smoke(tmp_path):
    """Three arms, full and LoRA attacks, per-epoch curves, judge and sample grids; the protected
    model is the evaluate() entry's routing target (a two-input forward)."""
    from sophon_fast.attacks.attack import Attack
    from sophon_fast.attacks.generation import is_noise_model

    model = tiny_unet()
    assert is_noise_model(model) and not is_noise_model(torch.nn.Linear(2, 2))
    normal = tiny_unet(seed=1)
    from sophon_fast.attacks.generation import evaluate_generation

    report = evaluate_generation(
        model,
        (images(12, 1, shift=0.4), images(6, 2, shift=0.4)),
        original=images(6, 3),
        normal=normal,
        attacks=[
            Attack(scope="full", optimizer="adam", lr=1e-3, batch_size=6, epochs=2),
            Attack(
                scope="lora", optimizer="momentum", lr=1e-2, batch_size=6, epochs=1, lora_rank=2
            ),
        ],
        diffusion_steps=20,
        samples=4,
        sample_steps=3,
        report_dir=tmp_path,
    )
    cells = report.data["cells"]
    assert sorted({c["arm"] for c in cells}) == ["normal", "protected", "scratch"]
    full = [c for c in cells if c["recipe"]["scope"] == "full"]
    assert all(len(c["restricted_mse"]) == 3 and len(c["original_mse"]) == 3 for c in full)
    assert all(set(c["restricted_fraction"]) == {"0", "2"} for c in full)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2 * 3 * 2
    assert (tmp_path / "report.json").exists() and "| protected |" in report.markdown()
    lora = [c for c in cells if c["recipe"]["scope"] == "lora" and c["arm"] == "protected"][0]
    assert lora["restricted_mse"][1] != lora["restricted_mse"][0]  # the adapters trained
    # the caller's models are untouched (attacks run on copies; LoRA merged into the copy)
    assert all(type(m) is SmallUNet for m in model.modules() if m is model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="scope"):
        evaluate_generation(model, (images(6, 1), images(6, 2)), attacks=[Attack(scope="last_k")])


def test_evaluate_routes_noise_models_to_generation_mode(monkeypatch):
    import sophon_fast
    from sophon_fast.attacks import generation

    seen = {}

    def fake(model, restricted, **kwargs):
        seen.update(kwargs, model=model)
        return "generation report"

    monkeypatch.setattr(generation, "evaluate_generation", fake)
    model = tiny_unet()
    data = (images(6, 1), images(6, 2))
    assert sophon_fast.evaluate(model, data, epochs=3, scratch=False) == "generation report"
    assert seen["model"] is model and seen["epochs"] == 3 and seen["scratch"] is False


def test_image_datasets_are_mapped_to_the_model_range():
    from sophon_fast.attacks.generation import _images
    from sophon_fast.data import ImageDataset

    x01 = torch.rand(4, 1, 8, 8)
    mapped = _images(ImageDataset(x01, torch.zeros(4, dtype=torch.int64), 1), "data")
    torch.testing.assert_close(mapped, x01 * 2 - 1)
    torch.testing.assert_close(_images(x01, "data"), x01)  # plain tensors are taken as given


def test_protect_maps_image_datasets_like_tensors_in_model_range():
    from sophon_fast.data import ImageDataset

    model = tiny_unet()
    # multiples of 1/128: (x + 1) / 2 and back are exact, so both runs see the same bits
    original, restricted = (torch.round(x * 128) / 128 for x in (images(20, 0), images(14, 1)))
    config = gen_config(outer_steps=1, dtype="float32")
    direct = protect(model, original, restricted, config, progress=False)
    wrapped = protect(
        model,
        ImageDataset((original + 1) / 2, torch.zeros(20, dtype=torch.int64), 1),
        ImageDataset((restricted + 1) / 2, torch.zeros(14, dtype=torch.int64), 1),
        config,
        progress=False,
    )
    for name, value in direct.model.state_dict().items():
        assert torch.equal(wrapped.model.state_dict()[name], value), name
