"""medhybrid.engines.fit: the SupervisedTrainer (checkpoints, exact resume, EMA) and its helpers."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_UNET as TINY

from medhybrid.core.config import ConfigError, validate
from medhybrid.core.devices import resolve_device
from medhybrid.engines.batches import CorruptionPrepareBatch
from medhybrid.engines.fit import TrainConfig, fit
from medhybrid.engines.handlers import GradientClipping, WiSEFT, unwrap
from medhybrid.engines.losses import PretrainLoss
from medhybrid.networks.checkpoints import latest_checkpoint
from medhybrid.networks.nets import ModelConfig, build_network

pytestmark = pytest.mark.usefixtures("workdir")


def _dataset(n: int = 12, size: int = 16) -> list[dict]:
    """Synthetic pairs: a bright square on a dark background, and its mask."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        r, c = torch.randint(0, size // 2, (2,), generator=g).tolist()
        lab = torch.zeros(1, size, size)
        lab[:, r : r + size // 2, c : c + size // 2] = 1
        img = (lab * 1.5 - 0.75 + 0.1 * torch.randn(3, size, size, generator=g)).clamp(-1, 1)
        out.append({"image": img, "label": lab, "index": len(out)})
    return out


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, epoch_length=2, batch_size=4, lr=1e-3, warmup_iterations=0, device="cpu", progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def _fit(folder, cfg: TrainConfig, seed: int = 0, model: ModelConfig = TINY, **kw):
    torch.manual_seed(seed)
    net = build_network(model, 3)
    return fit(net, _dataset(), CorruptionPrepareBatch("supervised", seed=cfg.seed), PretrainLoss("supervised"), cfg, folder, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------- config and helpers
def test_train_config():
    cfg = _cfg(epochs=4, epoch_length=25)
    assert cfg.iterations == 100
    with pytest.raises(ConfigError, match="epochs"):
        validate(TrainConfig, {"epochs": 0})
    with pytest.raises(ConfigError, match="lr"):
        validate(TrainConfig, {"lr": 0})
    with pytest.raises(ConfigError, match="backend"):
        validate(TrainConfig, {"backend": "mpi"})


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_unwrap():
    net = torch.nn.Linear(2, 2)
    assert unwrap(net) is net


# --------------------------------------------------------------------------------------------- fit
def test_fit_trains_and_keeps_the_last_two_checkpoints(tmp_path):
    torch.manual_seed(0)
    init = build_network(TINY, 3)
    res = _fit(tmp_path / "a", _cfg())
    assert res.iterations == 6 and res.resumed_from == 0 and res.metrics == {}
    assert not _same_weights(res.network, init)
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == ["train_checkpoint_4.pt", "train_checkpoint_6.pt"]
    state = torch.load(latest_checkpoint(tmp_path / "a"), weights_only=True)
    assert set(state) == {"network", "optimizer", "lr_scheduler", "trainer"}
    assert state["trainer"]["iteration"] == 6 and state["trainer"]["max_epochs"] == 3
    assert all(torch.equal(state["network"][k], v) for k, v in res.network.state_dict().items())


def test_fit_resume_from_checkpoint_is_exact(tmp_path):
    """A run stopped after its 2nd epoch and resumed ends with the same weights, bit for bit, as one that ran
    through: data order, noise, optimizer and LR schedule all continue from the checkpoint."""
    full = _fit(tmp_path / "full", _cfg(checkpoint_every=1))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "train_checkpoint_4.pt", tmp_path / "resumed" / "checkpoints")
    resumed = _fit(tmp_path / "resumed", _cfg(checkpoint_every=1), seed=123)  # other initial weights: overwritten
    assert resumed.resumed_from == 4 and resumed.iterations == 6
    assert _same_weights(resumed.network, full.network)


def test_fit_on_a_finished_folder_does_not_train(tmp_path):
    first = _fit(tmp_path / "a", _cfg())
    again = _fit(tmp_path / "a", _cfg(), seed=5)
    assert again.resumed_from == 6 and again.iterations == 6
    assert _same_weights(again.network, first.network)


def test_fit_with_ema_returns_the_average(tmp_path):
    res = _fit(tmp_path / "ema", _cfg(ema_decay=0.5))
    raw = _fit(tmp_path / "raw", _cfg())
    state = torch.load(latest_checkpoint(tmp_path / "ema"), weights_only=True)
    assert "ema_model" in state
    assert all(torch.equal(state["ema_model"][k], v) for k, v in res.network.state_dict().items())
    # the EMA weights are not the last iterate (which equals the run without EMA)
    assert all(torch.equal(state["network"][k], v) for k, v in raw.network.state_dict().items())
    assert not _same_weights(res.network, raw.network)


def test_fit_logs_epoch_loss_terms(tmp_path):
    seen = []

    def on_trainer(trainer):
        from ignite.engine import Events

        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(dict(e.state.metrics)))

    _fit(tmp_path / "a", _cfg(), on_trainer=on_trainer)
    assert len(seen) == 3
    # registered before fit's own epoch summary, so each epoch sees the previous epoch's means
    later = seen[-1]
    assert {"train_loss", "train_mask_loss"} <= set(later)
    assert later["train_loss"] == pytest.approx(later["train_mask_loss"])  # supervised: the loss is the mask term


def test_fit_draws_each_epoch_in_the_sampler_order(tmp_path):
    """Epoch e sees exactly the batches of ``EpochSeededSampler`` at epoch e (so a resumed epoch sees the same ones)."""
    from ignite.engine import Events

    from medhybrid.engines.batches import EpochSeededSampler

    seen: dict[int, list[int]] = {}

    def on_trainer(trainer):
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: seen.setdefault(e.state.epoch, []).extend(e.state.batch["index"].tolist()))

    cfg = _cfg(seed=7)
    _fit(tmp_path / "a", cfg, on_trainer=on_trainer)
    assert sorted(seen) == [1, 2, 3]
    for epoch, indices in seen.items():
        sampler = EpochSeededSampler(12, cfg.epoch_length * cfg.batch_size, seed=7)
        sampler.set_epoch(epoch)
        assert indices == list(sampler)
    assert seen[1] != seen[2]


def test_fit_checkpoints_after_the_epoch_is_logged(tmp_path):
    """An epoch's checkpoint is written after its summary and tracking: a run killed as soon as the checkpoint
    exists has logged every epoch up to it, and its resumed run starts after it, so no epoch goes unlogged."""
    from ignite.engine import Events

    logged = []

    class Tracker:  # stands in for the MLflow handler
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: logged.append(
                (e.state.epoch, "train_loss" in e.state.metrics, latest_checkpoint(tmp_path / "a"))))

    _fit(tmp_path / "a", _cfg(), mlflow_handler_factory=Tracker)
    assert [(epoch, has_loss) for epoch, has_loss, _ in logged] == [(1, True), (2, True), (3, True)]
    # when epoch e is logged, the newest checkpoint is still epoch e - 1's
    assert [c.name if c else None for *_, c in logged] == [None, "train_checkpoint_2.pt", "train_checkpoint_4.pt"]


def test_fit_compiled_trains_like_eager_and_saves_plain_weights(tmp_path, monkeypatch):
    """``compile=True`` runs the training forward through torch.compile: same updates as eager up to float rounding,
    and checkpoints keyed like the plain network (no ``_orig_mod.``). The graphs are captured (TorchDynamo) and split
    into forward and backward (AOTAutograd) as with the default backend, then run by ``aot_eager`` instead of compiled
    to C++ by inductor: a cold inductor build of this network costs about 2 minutes of CPU, and generating kernels is
    torch's part, not medhybrid's."""
    compile_, backends = torch.compile, []

    def aot_eager(model, **kw):
        backends.append(kw.get("backend", "inductor"))
        return compile_(model, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    cfg, small = _cfg(epochs=1, epoch_length=3), ModelConfig(channels=(16, 16), attention_levels=(False, False), num_head_channels=16)
    eager = _fit(tmp_path / "eager", cfg, model=small)
    compiled = _fit(tmp_path / "compiled", cfg.model_copy(update={"compile": True}), model=small)
    torch.manual_seed(0)
    init = build_network(small, 3).state_dict()
    a, b = eager.network.state_dict(), compiled.network.state_dict()
    assert a.keys() == b.keys() == init.keys()
    moved = sum((a[k] - init[k]).abs().sum().item() for k in a)
    gap = sum((a[k] - b[k]).abs().sum().item() for k in a)
    x = torch.stack([d["image"] for d in _dataset()[:4]])
    out_a, out_b = eager.network(x), compiled.network(x)
    print(f"weights moved {moved:.4g} (L1), eager-compiled gap {gap:.4g}; output gap "
          f"{(out_a - out_b).abs().max().item():.3g} of {out_a.abs().max().item():.3g}")
    assert gap < 1e-3 * moved  # Adam amplifies float rounding only where gradients are ~0
    assert torch.allclose(out_a, out_b, atol=1e-3 * out_a.abs().max().item())
    state = torch.load(latest_checkpoint(tmp_path / "compiled"), weights_only=True)
    assert state["network"].keys() == init.keys()
    assert backends == ["inductor"]  # one compile, asking for torch's default backend


def test_gradient_clipping():
    net = torch.nn.Linear(10, 1)
    (net(torch.ones(4, 10)) * 1000).sum().backward()

    def norm():
        return torch.sqrt(sum(p.grad.square().sum() for p in net.parameters())).item()

    assert norm() > 10

    class FakeEngine:
        network, scaler, amp = net, None, False

    GradientClipping(0.5)(FakeEngine())
    assert norm() == pytest.approx(0.5, rel=1e-4)


def test_wiseft_handler_leaves_the_interpolation_of_the_start_and_the_trained_weights(tmp_path):
    """Attached after what loads the start (here: a STARTED handler standing for a bundle's CheckpointLoader), the
    handler keeps those weights and, on completion, replaces the trained ones by (1 - alpha) x start + alpha x trained."""
    from ignite.engine import Events

    seen = {}

    def wire(trainer):
        def load_start(engine):  # what a CheckpointLoader does: set the weights training starts from
            with torch.no_grad():
                for p in unwrap(engine.network).parameters():
                    p.mul_(0.5)
            seen["start"] = {k: v.clone() for k, v in unwrap(engine.network).state_dict().items()}

        trainer.add_event_handler(Events.STARTED, load_start)
        trainer.add_event_handler(Events.COMPLETED, lambda e: seen.update(
            trained={k: v.clone() for k, v in unwrap(e.network).state_dict().items()}))
        WiSEFT(0.25).attach(trainer)

    out = _fit(tmp_path / "r", _cfg(epochs=1, epoch_length=3), on_trainer=wire).network.state_dict()
    moved = [k for k, v in seen["trained"].items() if v.is_floating_point() and not torch.equal(v, seen["start"][k])]
    assert len(moved) > 10  # training changed the weights, so the interpolation is not trivially either end
    for k, v in out.items():
        want = 0.75 * seen["start"][k] + 0.25 * seen["trained"][k] if v.is_floating_point() else seen["trained"][k]
        torch.testing.assert_close(v, want, rtol=0, atol=1e-7, msg=k)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        WiSEFT(1.5)


# --------------------------------------------------------------------------------------------- faults
def test_sigterm_mid_epoch_checkpoints_that_iteration_and_resumes_exactly(tmp_path):
    """A real SIGTERM to this process during iteration 3 (the middle of epoch 2): the run writes a checkpoint at
    iteration 3 and raises RunStopped; resumed, it draws the rest of epoch 2's batches and ends bit for bit where an
    uninterrupted run ends."""
    import os
    import signal

    from ignite.engine import Events

    from medhybrid.core.runs import RunStopped

    full = _fit(tmp_path / "full", _cfg(checkpoint_every=1))

    def stop_at_3(trainer):
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: os.kill(os.getpid(), signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped) as stop:
        _fit(tmp_path / "stopped", _cfg(checkpoint_every=1), on_trainer=stop_at_3)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only installed while training
    assert stop.value.signum == signal.SIGTERM and stop.value.iteration == 3
    assert stop.value.checkpoint == tmp_path / "stopped" / "checkpoints" / "train_checkpoint_3.pt"
    resumed = _fit(tmp_path / "stopped", _cfg(checkpoint_every=1), seed=123)
    assert resumed.resumed_from == 3 and resumed.iterations == 6
    assert _same_weights(resumed.network, full.network)


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """ENOSPC on the second checkpoint write (simulated: the write gets some bytes out, then the disk is full): the run
    stops with DiskFull naming the file, no partial file is left, and the first checkpoint loads and resumes."""
    import errno

    from medhybrid.core.files import DiskFull

    real_save = torch.save
    writes = []

    def save(obj, f, *a, **kw):
        writes.append(f)
        if len(writes) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    folder = tmp_path / "full-disk"
    with pytest.raises(DiskFull, match=r"no space left on device writing checkpoint .*train_checkpoint_4\.pt; the previous "
                                       r"checkpoint is intact"):
        _fit(folder, _cfg(checkpoint_every=1))
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["train_checkpoint_2.pt"]
    assert torch.load(folder / "checkpoints" / "train_checkpoint_2.pt", weights_only=True)["trainer"]["iteration"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    assert _fit(folder, _cfg(checkpoint_every=1)).resumed_from == 2
