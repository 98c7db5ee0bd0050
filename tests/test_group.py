"""Runs co-batched in one step (ti_fast.training.group): each run follows the trajectory it follows
alone, joins and leaves at step boundaries, resumes bitwise, and a NaN in one run stops that run
only. Plus the [[run]] / [sweep] TOML forms through the command line. CPU, tiny model, fp32."""
from __future__ import annotations

import csv
import shutil

import pytest
import torch

from ti_fast.cli import main
from ti_fast.training.demo import make_demo_images
from ti_fast.training.group import TrainGroup, train_many
from ti_fast.training.loop import train
from train_helpers import quick_config


def _vectors(path):
    return torch.load(path, weights_only=True)["string_to_param"]["*"]


def _rows(res):
    return list(csv.reader(open(res.log_dir / "loss.csv")))


def _three(model, root, data2):
    """Different vectors, lr schedules, steps, accumulation, batch, data and latent modes."""
    return [quick_config(model, root / "a", name="a", vectors=1, lr="0.01:3, 0.005", steps=6, seed=1),
            quick_config(model, root / "b", name="b", vectors=3, lr="0.02", steps=4, grad_accum=2, batch_size=2,
                         seed=2),
            quick_config(model, root / "c", name="c", vectors=2, lr="0.01", steps=5, data=str(data2), seed=3,
                         latents="random")]


@pytest.fixture
def data2(tmp_path):
    return make_demo_images(tmp_path / "other-images", n=5, size=64, seed=3)


def _close(a, b, rtol=1e-5):
    return ((a - b).norm() / a.norm()).item() <= rtol


def test_three_runs_together_follow_their_solo_trajectories(tiny_single, tmp_path, data2):
    alone = [train(c) for c in _three(tiny_single, tmp_path / "alone", data2)]
    together = train_many(_three(tiny_single, tmp_path / "group", data2))
    for x, y in zip(alone, together):
        assert y.status == "completed" and y.steps == x.steps
        assert _close(_vectors(x.embedding), _vectors(y.embedding)), x.name
        ra, rb = _rows(x), _rows(y)
        assert [r[0] for r in ra] == [r[0] for r in rb] and [r[4] for r in ra] == [r[4] for r in rb]
        for r, s in zip(ra[1:], rb[1:]):
            assert abs(float(r[3]) - float(s[3])) <= 1e-5 * max(1.0, abs(float(r[3])))


def test_a_run_added_midway_matches_it_alone(tiny_single, tmp_path):
    first = quick_config(tiny_single, tmp_path / "g" / "first", name="first", steps=8)
    late = quick_config(tiny_single, tmp_path / "g" / "late", name="late", steps=5, vectors=3, lr="0.03", seed=11)
    group = TrainGroup(first)
    group.add(first)
    for _ in range(3):
        assert group.step()
    assert group.active == ["first"]
    group.add(late)                                  # joins at the next step boundary
    results = group.run_all()
    solo = train(quick_config(tiny_single, tmp_path / "solo", name="late", steps=5, vectors=3, lr="0.03", seed=11))
    assert results["late"].steps == 5 and results["first"].steps == 8
    assert _close(_vectors(solo.embedding), _vectors(results["late"].embedding))


def test_resuming_an_interrupted_group_is_bitwise_equal(tiny_single, tmp_path, data2):
    ref = train_many(_three(tiny_single, tmp_path / "whole", data2))
    cfgs = _three(tiny_single, tmp_path / "parts", data2)
    group = TrainGroup(cfgs[0])
    for c in cfgs:
        group.add(c)
    for _ in range(3):
        group.step()
    group.interrupt()
    stopped = group.run_all()
    assert {r.status for r in stopped.values()} == {"interrupted"}
    assert all(r.steps == 3 for r in stopped.values())
    for c in cfgs:
        c.resume = True
    resumed = train_many(cfgs)
    for x, y in zip(ref, resumed):
        assert y.steps == x.steps and torch.equal(_vectors(x.embedding), _vectors(y.embedding)), x.name
        assert _rows(x) == _rows(y)


def test_nan_in_one_run_stops_that_run_only(tiny_single, tmp_path):
    good = quick_config(tiny_single, tmp_path / "good", name="good", steps=6)
    bad = quick_config(tiny_single, tmp_path / "bad", name="bad", steps=30, lr="1e30", allow_huge_lr=True)
    res = {r.name: r for r in train_many([good, bad])}
    assert res["good"].status == "completed" and res["good"].steps == 6
    assert res["bad"].status == "failed" and "NaN" in res["bad"].error
    v = _vectors(res["bad"].embedding)
    assert torch.isfinite(v).all()                   # the last good vectors, saved
    assert torch.load(res["bad"].embedding, weights_only=True)["step"] == res["bad"].steps < 30


def test_process_wide_settings_must_agree(tiny_single, tmp_path):
    from ti_fast.errors import ConfigError
    a = quick_config(tiny_single, tmp_path / "a", name="a")
    b = quick_config(tiny_single, tmp_path / "b", name="b", clip_skip=2)
    with pytest.raises(ConfigError, match="--clip-skip"):
        train_many([a, b])


def _toml(tmp_path, model, body: str):
    images = make_demo_images(tmp_path / "imgs", n=3, size=64)
    p = tmp_path / "runs.toml"
    p.write_text(f'model = "{model}"\ndata = "{images}"\ndevice = "cpu"\nwidth = 64\nheight = 64\nsteps = 3\n'
                 f'template = "subject"\ninit-text = "ring"\nquiet = true\nsave-every = 0\nseed = 5\n'
                 f'out = "{tmp_path / "out"}"\n' + body)
    return p


def test_run_tables_through_the_cli(tiny_single, tmp_path, capsys):
    p = _toml(tmp_path, tiny_single, f'[[run]]\nname = "one"\nlog-dir = "{tmp_path / "l1"}"\n'
                                     f'[[run]]\nname = "two"\nvectors = 3\nlr = 0.02\nlog-dir = "{tmp_path / "l2"}"\n')
    assert main(["train", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "one" in out and "two" in out and "completed" in out and "summary:" in out
    assert (tmp_path / "out" / "one.pt").exists() and _vectors(tmp_path / "out" / "two.pt").shape[0] == 3
    settings = (tmp_path / "l2" / "settings.json").read_text()
    assert '"co_batched_with": [\n' in settings and '"one"' in settings


def test_sweep_names_outputs_and_summary(tiny_single, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = _toml(tmp_path, tiny_single, 'name = "cat"\n[sweep]\nlr = ["0.01", "0.02"]\nvectors = [1, 2]\n')
    assert main(["train", "--config", str(p)]) == 0
    names = ["cat-lr0.01-vectors1", "cat-lr0.01-vectors2", "cat-lr0.02-vectors1", "cat-lr0.02-vectors2"]
    for n in names:
        assert (tmp_path / "out" / f"{n}.pt").exists() and (tmp_path / "ti-logs" / n / "loss.csv").exists()
    (summary,) = list((tmp_path / "ti-logs").glob("summary-*.csv"))
    rows = list(csv.DictReader(open(summary)))
    assert [r["name"] for r in rows] == names and {r["status"] for r in rows} == {"completed"}
    assert set(rows[0]) >= {"lr", "vectors", "final_loss", "best_loss", "steps", "wall_s"}
    assert "cat-lr0.02-vectors2" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "ti-logs")


def test_sweep_columns_include_a_hypernetworks_own_settings():
    from ti_fast.training.config import HypernetworkTrainConfig
    from ti_fast.training.runs_config import sweep_values
    cfgs = [HypernetworkTrainConfig(name=f"h{i}", activation=a, lr=lr)
            for i, (a, lr) in enumerate((("relu", "1e-5"), ("tanh", "1e-5"), ("tanh", "2e-5")))]
    assert sweep_values(cfgs) == ["lr", "activation"]
