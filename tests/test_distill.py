"""1.x-Distill units on a tiny random model: schedules, re-noising, importance sampling, guidance control,
the block cache and compensation, the student file (and its refusals), one step of each stage."""


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill_core.cache import CacheRange, Compensation, effective_nfe, recording, replaying
from distill_core.conditioning import Conditioning
from distill_core.flow import renoise, student_schedule, teacher_grid, window_bounds
from distill_core.importance import importance_weights, sample_in_windows
from distill_core.models import guided_velocity
from distill_core.nets import build_roles
from distill_core.stage1 import Stage1, Stage1Config, pseudo_huber_dmd_loss
from distill_core.stage2 import Stage2, Stage2Config
from distill_core.student import blocks_of, load_student, run_student, save_student
from distill_core.updates import Ranks
from xslim_demo.distill import load_demo_teacher
from xslim_lab.tiny import write_tiny_teacher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_teacher(str(tmp_path_factory.mktemp("tiny") / "teacher.safetensors"))
    return path, load_demo_teacher(path)


def _inputs(teacher, n=4, seed=0):
    """Noise and the conditioning of n random classes (the demo's prompt set holds the ten classes in order)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 1, 8, 8, generator=g), teacher.prompts.batch(torch.randint(10, (n,), generator=g))


def _model_blocks(net):
    return [spec.module for spec in blocks_of(net)]


def test_student_schedule_is_snapped_to_the_shifted_teacher_grid():
    grid = teacher_grid(3.0)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 1001
    for steps, expected in ((2, [1.0, 0.75, 0.0]), (4, [1.0, 0.9, 0.75, 0.5, 0.0])):
        idx = student_schedule(steps, 3.0, grid)
        assert [float(grid[i]) for i in idx] == pytest.approx(expected, abs=1e-3)
        assert idx == sorted(idx)
    assert window_bounds(student_schedule(2, 3.0, grid), 0) == (0, student_schedule(2, 3.0, grid)[1] - 1)


def test_renoise_reaches_the_target_noise_level():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.5)
    x = (1 - 0.3) * x0 + 0.3 * torch.randn(x0.shape, generator=g)
    y = renoise(x, 0.3, 0.8, torch.randn(x0.shape, generator=g))
    assert y.mean().item() == pytest.approx((1 - 0.8) * 0.5, abs=0.02)
    assert y.std().item() == pytest.approx(0.8, abs=0.02)
    final = renoise(x0, torch.zeros(20000), torch.full((20000,), 0.6), torch.randn(x0.shape, generator=g))
    assert final.std().item() == pytest.approx(0.6, abs=0.02)


def test_importance_sampling_stays_in_window_and_follows_the_weights():
    w = importance_weights()
    assert w.min() >= 1e-6
    assert float(teacher_grid(3.0)[int(w.argmax())]) == pytest.approx(0.91, abs=0.01)  # the spec's computed peak
    idx = student_schedule(2, 3.0, teacher_grid(3.0))
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([0] * 400 + [1] * 400)
    picks = sample_in_windows(k, idx, w, g)
    assert (picks[:400] < idx[1]).all() and (picks[400:] >= idx[1]).all() and (picks[400:] < idx[2]).all()
    uniform = sample_in_windows(k, idx, None, g)
    # window 1 starts at the anchor peak's falling side: weighted picks sit nearer its noisy start than uniform ones
    assert picks[400:].float().mean() < uniform[400:].float().mean() - 50


def _probe(x, sigma, cond):
    """A fake teacher: its velocity is the conditioning's first value (the unconditional prompt encodes 0)."""
    return cond.context[:, 0, 0].reshape(-1, 1, 1, 1, 1).expand_as(x).clone()


def test_guidance_control_uses_cfg_only_below_the_switch():
    x = torch.zeros(4, 16, 1, 8, 8)
    cond = Conditioning(torch.tensor([2.0, 3.0, 4.0, 5.0]).reshape(4, 1, 1))
    uncond = Conditioning(torch.zeros(1, 1, 1))
    sigma = torch.tensor([0.99, 0.97, 0.5, 0.1])
    out = guided_velocity(_probe, x, sigma, cond, uncond, scale=3.0, switch=0.96)
    per_row = out.flatten(1)[:, 0]
    assert per_row.tolist() == pytest.approx([2, 3, 3 * 4, 3 * 5])  # cond above, 0 + 3 (cond - 0) below
    plain = guided_velocity(_probe, x, sigma, cond, uncond, scale=3.0, switch=1.0).flatten(1)[:, 0]
    assert plain.tolist() == pytest.approx([6, 9, 12, 15])


def test_pseudo_huber_dmd_gradient_is_sign_like_and_normalised():
    x_hat = torch.zeros(2, 3, requires_grad=True)
    target = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 4.0]])
    norm = torch.tensor([[1.0], [2.0]])
    pseudo_huber_dmd_loss(x_hat, target, norm, 4e-3).backward()
    expected = -torch.sign(target) / norm / target.numel()
    assert torch.allclose(x_hat.grad, expected, rtol=1e-3)


def _count_block_work(net):
    calls = []
    hooks = [b.norm1.register_forward_hook(lambda *a: calls.append(1)) if hasattr(b, "norm1") else
             b.norm.register_forward_hook(lambda *a: calls.append(1)) for b in _model_blocks(net)]
    return calls, hooks


def test_cache_replay_of_the_same_input_is_exact_and_skips_the_range(tiny):
    _, teacher = tiny
    net, _, _ = build_roles(teacher.flow)
    x, labels = _inputs(teacher)
    sigma = torch.full((4,), 0.75)
    cache = CacheRange(1, 2)
    full = net(x, sigma, labels)
    with recording(blocks_of(net), cache) as store:
        recorded = net(x, sigma, labels)
    assert torch.equal(full, recorded) and set(store) == {"img", "txt"}
    calls, hooks = _count_block_work(net)
    comp = Compensation(32)  # zero-initialised last layer: plain reuse
    with replaying(blocks_of(net), cache, dict(store), comp):
        replayed = net(x, sigma, labels)
    for h in hooks:
        h.remove()
    assert len(calls) == len(_model_blocks(net)) - cache.size
    assert torch.allclose(replayed, full, atol=1e-5)
    with replaying(blocks_of(net), cache, dict(store), None):
        assert torch.allclose(net(x, sigma, labels), replayed)
    assert "forward" not in vars(_model_blocks(net)[1])  # patches are gone after the context
    other = net(x, torch.full((4,), 0.3), labels)
    assert not torch.allclose(other, full)


def test_effective_nfe():
    assert effective_nfe(2, CacheRange(1, 3), 12) == pytest.approx(1.75)
    assert effective_nfe(2, CacheRange(1, 4), 12) == pytest.approx(1 + 8 / 12)
    assert effective_nfe(2, None, 12) == 2.0
    with pytest.raises(ValueError):
        CacheRange(3, 1)


def _save_tiny_student(tiny, path, cache=None):
    cache = cache or CacheRange(1, 1)
    _, teacher = tiny
    _, net, _ = build_roles(teacher.flow)
    comp = Compensation(32)
    torch.nn.init.normal_(comp.img.fc2.weight, std=0.1)  # a non-trivial compensation
    base = teacher.base
    save_student(path, net, [1.0, 0.75, 0.0], 3.0, cache, comp, base, class_table=teacher.class_table)
    return net, comp, base


def test_student_file_round_trip_configures_the_sampler(tiny, tmp_path):
    path = str(tmp_path / "student.safetensors")
    net, comp, base = _save_tiny_student(tiny, path)
    student = load_student(path, base_hash=base["hash"], base_family="hunyuan_video")
    assert student.sigmas == [1.0, 0.75, 0.0] and student.cache == CacheRange(1, 1)
    assert student.effective_nfe == pytest.approx(1 + 2 / 3) and student.meta["cfg"] == "1"
    x, labels = _inputs(tiny[1])
    with torch.no_grad():
        expected = run_student(net, x, labels, [1.0, 0.75, 0.0], CacheRange(1, 1), comp)
        without_comp = run_student(net, x, labels, [1.0, 0.75, 0.0], CacheRange(1, 1), None)
    assert torch.allclose(student.sample(x, labels), expected, atol=1e-5)
    assert not torch.allclose(expected, without_comp, atol=1e-4)  # the compensation is actually applied


def test_bad_student_files_are_refused_with_file_and_problem(tiny, tmp_path):
    path = str(tmp_path / "student.safetensors")
    _, _, base = _save_tiny_student(tiny, path)
    with pytest.raises(ValueError, match="distilled from base model") as err:
        load_student(path, base_hash="0123456789abcdef")
    assert path in str(err.value)
    with pytest.raises(ValueError, match="'flux' model|is a student of"):
        load_student(path, base_family="flux")
    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    broken = str(tmp_path / "broken.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.proj_out.weight"}, broken, metadata=meta)
    with pytest.raises(ValueError, match="missing 1 model tensor.*proj_out.weight") as err:
        load_student(broken)
    assert broken in str(err.value)
    no_comp = str(tmp_path / "no_comp.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("comp.")}, no_comp, metadata=meta)
    with pytest.raises(ValueError, match="missing .* compensation"):
        load_student(no_comp)
    pickle = tmp_path / "student.ckpt"
    pickle.write_bytes(b"\x80\x04\x95 not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file") as err:
        load_student(str(pickle))
    assert str(pickle) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_student(str(tmp_path / "nowhere.safetensors"))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def _stage1(teacher, cfg):
    frozen, student, fake = build_roles(teacher.flow)
    return Stage1(cfg, student, fake, frozen, teacher.prompts, Ranks())


def test_stage1_step_updates_student_and_fake_score(tiny):
    _, teacher = tiny
    stage = _stage1(teacher, Stage1Config(lr_student=1e-3, lr_fake=1e-3))
    teacher_before, s_before, f_before = _params(teacher.flow.module), _params(stage.student.module), _params(stage.fake.module)
    metrics = stage.step(0, 4, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert _changed(s_before, stage.student.module) and _changed(f_before, stage.fake.module)
    assert not _changed(teacher_before, teacher.flow.module)
    xs, vs, delta = stage.simulate(*_inputs(teacher))
    assert xs.shape[0] == 3 and vs.shape[0] == 2 and delta is None


def test_stage1_cache_cotraining_trains_the_deployed_cached_sampler(tiny):
    """With a cached range, Stage I simulates exactly the 1.x sampler and steps student and compensation together."""
    _, teacher = tiny
    cfg = Stage1Config(lr_student=1e-3, lr_fake=1e-3, lr_comp=1e-2, cache_first=1, cache_last=2)
    stage = _stage1(teacher, cfg)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        stage.step(i, 4, gen)
    assert any(p.abs().sum() > 0 for p in stage.compensation.img.fc2.parameters())  # left its zero init
    z, labels = _inputs(teacher)
    xs, vs, delta = stage.simulate(z, labels)
    with torch.no_grad():
        deployed = run_student(stage.student, z, labels, stage.sigmas, stage.cache, stage.compensation)
        uncached = run_student(stage.student, z, labels, stage.sigmas)
        # the student update's velocity for rows in the last window is the cached step's, for the first the full one
        k = torch.tensor([0, 1, 1, 0])
        rows = torch.arange(4)
        v = stage._student_velocity(xs[k, rows], torch.tensor(stage.sigmas)[k], labels, k, delta)
    assert torch.allclose(xs[-1], deployed, atol=1e-6) and not torch.allclose(deployed, uncached, atol=1e-4)
    assert torch.allclose(v, vs[k, rows], atol=1e-5)


def test_stage2_schedule_warms_up_discriminator_then_compensation_then_student(tiny, tmp_path):
    _, teacher = tiny
    ref_path = str(tmp_path / "ref.safetensors")
    frozen, student, reference = build_roles(teacher.flow)
    save_student(ref_path, reference, [1.0, 0.9, 0.75, 0.5, 0.0], 3.0, None, None, teacher.base, class_table=teacher.class_table)
    cfg = Stage2Config(cache_first=1, cache_last=1, disc_blocks=(0, 2), disc_warmup=2, comp_warmup=4, g_every=2)
    stage = Stage2(cfg, student, load_student(ref_path), frozen, teacher.prompts, Ranks())
    gen = torch.Generator().manual_seed(0)
    parts = {"student": stage.student.module, "comp": stage.compensation, "disc": stage.disc.trainable()}

    def run(iteration):
        before = {k: _params(m) for k, m in parts.items()}
        metrics = stage.step(iteration, 2, gen)
        return {k for k, m in parts.items() if _changed(before[k], m)}, metrics

    assert run(0)[0] == {"disc"}  # discriminator-only warm-up
    changed, metrics = run(2)  # generator turn inside the compensation warm-up
    assert changed == {"comp"} and "loss_g" in metrics
    assert run(3)[0] == {"disc"}
    assert run(4)[0] == {"student", "comp"}


def _pairs(teacher, tmp_path, count=6, steps=3, scale=2.0):
    from distill_core.pairs import PairSettings, load_or_make_pairs

    settings = PairSettings(count, steps, 3.0, scale, 0)
    return load_or_make_pairs(str(tmp_path), 0, teacher.flow, teacher.prompts, (16, 1, 8, 8), settings, torch.device("cpu"))


def test_teacher_pairs_are_the_teachers_own_samples_kept_in_the_run_folder(tiny, tmp_path):
    from distill_core.pairs import PAIRS_FILE, teacher_sample

    _, teacher = tiny
    pairs = _pairs(teacher, tmp_path)
    cond = teacher.prompts.batch(pairs["index"])
    again = teacher_sample(teacher.flow, pairs["noise"], cond, teacher.prompts, 3, 3.0, 2.0)
    assert torch.allclose(pairs["sample"], again, atol=1e-5) and not torch.allclose(pairs["sample"], pairs["noise"])
    path = tmp_path / PAIRS_FILE.format(rank=0)
    stamp = path.stat().st_mtime_ns
    reread = _pairs(teacher, tmp_path)  # same settings: read back, not sampled again
    assert path.stat().st_mtime_ns == stamp and all(torch.equal(reread[k], pairs[k]) for k in pairs)
    other = _pairs(teacher, tmp_path, scale=3.0)  # other settings: made again
    assert path.stat().st_mtime_ns != stamp and not torch.allclose(other["sample"], pairs["sample"])


def _pair_gap(stage, pairs, cond) -> float:
    """Mean |deployed sampler's output - teacher's sample| over the pairs."""
    with torch.no_grad():
        out = run_student(stage.student, pairs["noise"], cond, stage.sigmas, stage.cache, stage.compensation)
    return (out - pairs["sample"]).abs().mean().item()


@pytest.mark.parametrize("cache", [None, (1, 2)])
def test_stage1_regression_pulls_the_deployed_sampler_onto_the_teacher_pairs(tiny, tmp_path, cache):
    """DMD's paired regression: with it, the student's deployed output from a pair's noise moves towards the
    teacher's sample from that noise, further than the distribution-matching term alone moves it."""
    _, teacher = tiny
    pairs = _pairs(teacher, tmp_path)
    first, last = cache or (None, None)
    gaps = {}
    for weight in (0.0, 20.0):
        cfg = Stage1Config(lr_student=2e-4, lr_fake=1e-3, regression_weight=weight, regression_batch=6,
                           cache_first=first, cache_last=last)  # fmt: skip
        stage = _stage1(teacher, cfg)
        stage.use_pairs(pairs)
        gen = torch.Generator().manual_seed(0)
        cond = teacher.prompts.batch(pairs["index"])

        before = _pair_gap(stage, pairs, cond)
        for i in range(6):
            metrics = stage.step(i, 4, gen)
        assert ("regression_gap" in metrics) == (weight > 0)
        gaps[weight] = (before, _pair_gap(stage, pairs, cond))
    assert gaps[0.0][0] == pytest.approx(gaps[20.0][0])  # the same start
    assert gaps[20.0][1] < 0.8 * gaps[20.0][0] and gaps[20.0][1] < gaps[0.0][1]
