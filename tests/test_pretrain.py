"""medhybrid.workflows.pretrain: every mode on real images, its files and its MLflow run; reruns, resume after a kill,
several processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ISIC, TINY_NET, TINY_TRAIN, artifact_paths, cli_env, mlflow_client, write_dataset_yaml
from PIL import Image

from medhybrid.core.config import ConfigError, apply_overrides, dump_config, load_config, validate
from medhybrid.data.io import DataError
from medhybrid.networks.checkpoints import load_model
from medhybrid.networks.nets import ModelConfig, build_network
from medhybrid.workflows.pretrain import MODES, PretrainConfig, run_pretraining

pytestmark = pytest.mark.usefixtures("workdir")

VAL_METRIC = {"hybrid": "val_dice", "supervised": "val_dice", "diffusion": "val_recon_mse", "mdm": "val_recon_mse"}
LOSS_TERMS = {"hybrid": {"train_denoise_loss", "train_mask_loss"}, "supervised": {"train_mask_loss"},
              "diffusion": {"train_denoise_loss"}, "mdm": {"train_ssim_loss"}}


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _runs(client, experiment: str = "medhybrid"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- each mode
@pytest.mark.parametrize("mode", ["hybrid", "supervised", "diffusion", "mdm"])
def test_pretrain_mode_learns_and_is_recorded(mode, isic_tiny, pretrain_cfg, mlflow_uri):
    cfg = pretrain_cfg(isic_tiny, mode)
    res = run_pretraining(cfg)
    folder = cfg.folder

    # the model: weights + metadata, loadable without pickles
    assert res.folder == folder and res.checkpoint == folder / "model.pt"
    raw = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
    net, meta = load_model(res.checkpoint)
    assert meta["mode"] == mode and meta["dataset"] == "isic_tiny"
    assert (meta["image_channels"], meta["mask_channels"], meta["num_classes"]) == (3, 1, 2)
    assert meta["preprocess"]["resolution"] == 32 and tuple(meta["model"]["channels"]) == (16, 32, 32)
    assert _same_weights(net.state_dict(), raw["state_dict"])
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 32, 32), 0.5).shape == (1, 4, 32, 32)

    # checkpoints (the last two, by iteration), resolved config, previews, state
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["pretrain_checkpoint_12.pt", "pretrain_checkpoint_16.pt"]
    last = torch.load(folder / "checkpoints" / "pretrain_checkpoint_16.pt", weights_only=True)
    assert _same_weights(last["network"], raw["state_dict"])
    assert dump_config(load_config(PretrainConfig, folder / "config.yaml")) == dump_config(cfg)
    assert sorted(p.name for p in (folder / "previews").iterdir()) == [f"epoch_00{e}.png" for e in (1, 2, 3, 4)]
    with Image.open(folder / "previews" / "epoch_004.png") as im:  # 4 rows of 4 val images, 32 px, x2
        assert im.size == (2 * (4 * 34 + 2), 2 * (4 * 34 + 2))
    state = json.loads((folder / "state.json").read_text())
    assert state["status"] == "finished" and state["mode"] == mode and state["world_size"] == 1
    assert state["mlflow_run_id"] == res.run_id and state["metrics"] == res.metrics

    # the MLflow run
    c = mlflow_client(mlflow_uri)
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"pretrain-{mode}-isic_tiny"
    p = run.data.params
    assert p["mode"] == mode and p["dataset.name"] == "isic_tiny" and p["train.lr"] == "0.001"
    assert p["model.channels"] == "[16, 32, 32]" and p["preprocess.resolution"] == "32"
    t = run.data.tags
    assert (t["medhybrid.stage"], t["medhybrid.mode"], t["medhybrid.dataset"]) == ("pretrain", mode, "isic_tiny")
    assert t["medhybrid.folder"] == str(folder.resolve())
    assert artifact_paths(c, res.run_id) == ["config.yaml", "model.pt"] + [f"previews/epoch_00{e}.png" for e in (1, 2, 3, 4)]

    # the training loss falls (fixed seed: first vs last epoch of 4 x 4 iterations)
    loss = _history(c, res.run_id, "train_loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert loss[-1][1] < 0.97 * loss[0][1], loss
    assert LOSS_TERMS[mode] <= set(run.data.metrics)
    # validation: once per epoch, logged at the trainer's epoch, and the final value is the result's
    key = VAL_METRIC[mode]
    val = _history(c, res.run_id, key)
    assert [s for s, _ in val] == [1, 2, 3, 4]
    assert res.metrics[key] == pytest.approx(val[-1][1])
    if key == "val_dice":
        assert 0.0 < res.metrics[key] <= 1.0
    else:
        levels = [0.25, 0.5, 0.75] if mode == "mdm" else [0.05, 0.2, 0.5, 1, 2]
        per_level = [res.metrics[f"val_recon_mse_{lv:g}"] for lv in levels]
        assert res.metrics[key] == pytest.approx(np.mean(per_level))
        assert per_level == sorted(per_level)  # more corruption, worse reconstruction
        assert all(f"val_recon_mse_{lv:g}" in run.data.metrics for lv in levels)


def test_pretrain_none_is_the_seeded_random_init(isic_tiny, pretrain_cfg, mlflow_uri):
    cfg = pretrain_cfg(isic_tiny, "none", "train.seed=3")
    res = run_pretraining(cfg)
    net, meta = load_model(res.checkpoint)
    torch.manual_seed(3)
    fresh = build_network(ModelConfig(channels=(16, 32, 32), attention_levels=(False, False, False)), 3)
    assert meta["mode"] == "none" and _same_weights(net.state_dict(), fresh.state_dict())
    assert not (cfg.folder / "checkpoints").exists() and res.metrics == {}
    assert json.loads((cfg.folder / "state.json").read_text())["status"] == "finished"
    c = mlflow_client(mlflow_uri)
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.params["mode"] == "none" and run.data.metrics == {}
    assert artifact_paths(c, res.run_id) == ["config.yaml", "model.pt"]


def test_modes_share_one_architecture(isic_tiny, pretrain_cfg):
    """Every mode builds the same network, so any checkpoint initialises any fine-tuning run."""
    assert set(MODES) == {"hybrid", "supervised", "diffusion", "mdm", "none"}
    keys = {m: tuple((k, tuple(v.shape)) for k, v in build_network(pretrain_cfg(isic_tiny, m).model, 3).state_dict().items())
            for m in MODES}
    assert len(set(keys.values())) == 1


def test_pretrain_grey_source_with_ignored_pixels(v7_tiny, pretrain_cfg, mlflow_uri):
    """V7 chest X-rays: grey images of many sizes, masks with the ignore value 127."""
    from medhybrid.data.transforms import IGNORE_INDEX
    from medhybrid.workflows.pretrain import source_datasets

    cfg = pretrain_cfg(v7_tiny, "hybrid", "train.epochs=2", "train.epoch_length=3")
    train_ds, _ = source_datasets(cfg)
    labels = torch.stack([torch.as_tensor(d["label"]) for d in train_ds])
    assert (labels == IGNORE_INDEX).any() and set(labels.unique().tolist()) <= {IGNORE_INDEX, 0.0, 1.0}
    assert all(d["image"].shape == (1, 32, 32) for d in train_ds)

    res = run_pretraining(cfg)
    net, meta = load_model(res.checkpoint)
    assert meta["image_channels"] == 1 and net.image_channels == 1 and net.mask_channels == 1
    assert 0.0 <= res.metrics["val_dice"] <= 1.0
    c = mlflow_client(mlflow_uri)
    assert c.get_run(res.run_id).info.status == "FINISHED"
    assert [s for s, _ in _history(c, res.run_id, "train_loss")] == [1, 2]
    assert all(np.isfinite(v) for _, v in _history(c, res.run_id, "train_loss"))
    with Image.open(cfg.folder / "previews" / "epoch_002.png") as im:
        assert im.size == (2 * (4 * 34 + 2), 2 * (4 * 34 + 2))


# --------------------------------------------------------------------------------------------- reruns and config
def test_rerun_of_finished_run_does_nothing(isic_tiny, pretrain_cfg, mlflow_uri):
    cfg = pretrain_cfg(isic_tiny, "supervised", "train.epochs=1", "train.epoch_length=2")
    first = run_pretraining(cfg)
    stamp = (cfg.folder / "model.pt").stat().st_mtime_ns
    ckpts = sorted(p.name for p in (cfg.folder / "checkpoints").iterdir())

    # the same config (tracking name and progress bar aside) finds the finished run
    same = pretrain_cfg(isic_tiny, "supervised", "train.epochs=1", "train.epoch_length=2", "mlflow.run_name=renamed",
                        "train.progress=true")
    again = run_pretraining(same)
    assert again.run_id == first.run_id and again.checkpoint == first.checkpoint and again.metrics == first.metrics
    assert (cfg.folder / "model.pt").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (cfg.folder / "checkpoints").iterdir()) == ckpts
    c = mlflow_client(mlflow_uri)
    assert [r.info.run_id for r in _runs(c)] == [first.run_id]

    # another config in the same folder is refused, and leaves the run alone
    other = pretrain_cfg(isic_tiny, "supervised", "train.epochs=1", "train.epoch_length=2", "train.lr=5e-4")
    with pytest.raises(ConfigError, match="holds a run of a different configuration"):
        run_pretraining(other)
    assert json.loads((cfg.folder / "state.json").read_text())["status"] == "finished"
    assert (cfg.folder / "model.pt").stat().st_mtime_ns == stamp and len(_runs(c)) == 1


def test_same_run_name_different_folders_are_two_runs(isic_tiny, pretrain_cfg, mlflow_uri):
    a = run_pretraining(pretrain_cfg(isic_tiny, "none", "mlflow.run_name=shared", out="a"))
    b = run_pretraining(pretrain_cfg(isic_tiny, "none", "mlflow.run_name=shared", out="b"))
    assert a.run_id != b.run_id
    c = mlflow_client(mlflow_uri)
    runs = {r.info.run_id: r for r in _runs(c)}
    assert set(runs) == {a.run_id, b.run_id}
    assert {r.info.run_name for r in runs.values()} == {"shared"}
    assert runs[a.run_id].data.tags["medhybrid.folder"] == str(a.folder.resolve())
    assert runs[b.run_id].data.tags["medhybrid.folder"] == str(b.folder.resolve())


def test_config_hash_ignores_execution_settings(isic_tiny, pretrain_cfg):
    """How a run executes (progress bar, torch.compile) is not what it computes: same hash, so a run
    started one way resumes the other; a change to the schedule is a different run."""
    from medhybrid.core.runs import config_hash

    base = config_hash(pretrain_cfg(isic_tiny))
    assert config_hash(pretrain_cfg(isic_tiny, "hybrid", "train.compile=true", "train.progress=false")) == base
    assert config_hash(pretrain_cfg(isic_tiny, "hybrid", "train.lr=0.0005")) != base


def test_pretrain_refuses_a_target_dataset(ph2_tiny, workdir):
    with pytest.raises(ConfigError, match="is a target dataset; pretraining uses a source domain"):
        validate(PretrainConfig, {"dataset": str(ph2_tiny)}, context={"base_dir": str(workdir)})


def test_pretrain_config_from_yaml_with_relative_dataset(isic_tiny, workdir, mlflow_uri):
    """A pretrain YAML names its dataset relative to itself; output_dir defaults under runs/ in the working folder."""
    conf = workdir / "conf"
    conf.mkdir()
    (conf / "p.yaml").write_text(yaml.safe_dump({"dataset": os.path.relpath(isic_tiny, conf), "mode": "diffusion"}))
    cfg = load_config(PretrainConfig, conf / "p.yaml", [*TINY_NET, f"mlflow.tracking_uri={mlflow_uri}"])
    assert cfg.dataset.name == "isic_tiny" and cfg.dataset.root == ISIC
    assert cfg.folder == Path("runs") / "pretrain" / "isic_tiny-diffusion" and cfg.run_name == "pretrain-diffusion-isic_tiny"


def test_bad_data_is_caught_before_training(data, tmp_path, pretrain_cfg, mlflow_uri):
    """With ``train.check_data`` (the default) every file is opened before training: a mask with a stray value
    stops the run with the file named, before any checkpoint, and the MLflow run is marked FAILED."""
    root = tmp_path / "isic_copy"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    split = json.loads((ISIC / "split.json").read_text())
    ids = {"train": split["train"][:6], "val": split["val"][:2]}
    for sid in ids["train"] + ids["val"]:
        shutil.copy(ISIC / "images" / f"{sid}.jpg", root / "images")
        shutil.copy(ISIC / "masks" / f"{sid}_segmentation.png", root / "masks")
    bad = root / "masks" / f"{ids['train'][3]}_segmentation.png"
    m = np.asarray(Image.open(bad)).copy()
    m[:4, :4] = 128
    Image.fromarray(m).save(bad)
    spec = write_dataset_yaml(tmp_path / "datasets", "isic_copy", root, ids, role="source", mask_suffix="_segmentation", channels=3)

    cfg = pretrain_cfg(spec, "supervised", "train.check_data=true")
    with pytest.raises(DataError) as info:
        run_pretraining(cfg)
    msg = str(info.value)
    assert "failed its check" in msg and bad.name in msg and "unexpected values 128" in msg
    assert not (cfg.folder / "checkpoints").exists() and not (cfg.folder / "model.pt").exists()
    state = json.loads((cfg.folder / "state.json").read_text())
    assert state["status"] == "failed"
    assert mlflow_client(mlflow_uri).get_run(state["mlflow_run_id"]).info.status == "FAILED"


# --------------------------------------------------------------------------------------------- resume after a kill
def _cli(config: Path, out: Path, mlflow_uri: str) -> list[str]:
    return [sys.executable, "-m", "medhybrid.cli", "pretrain", "--config", str(config), f"output_dir={out}",
            f"mlflow.tracking_uri={mlflow_uri}"]


def _descendants(pid: int) -> list[int]:
    """The PIDs of every process ``pid`` started, children first-level then theirs (Linux ``/proc``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for c in children:
            found += [c, *_descendants(c)]
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process this test started and everything it started, by PID (the ranks that torchrun starts each
    in a session of their own included); never by a name pattern, which could match a stranger's process."""
    for pid in [*_descendants(proc.pid), proc.pid]:  # listed before any dies, so none is re-parented unseen
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_at_first_checkpoint(cmd: list[str], cwd: Path, folder: Path, kill, timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd`` and ``kill(proc)`` it as soon as ``folder/checkpoints`` holds a checkpoint; return it, ended."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not list((folder / "checkpoints").glob("*.pt")):
            assert proc.poll() is None, f"pretraining ended before its first checkpoint:\n{proc.stderr.read().decode()[-3000:]}"
            assert time.time() < deadline, f"no checkpoint within {timeout:.0f} s"
            time.sleep(0.05)
        kill(proc)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            kill(proc)
            proc.kill()
            proc.wait()
    proc.stderr.close()
    return proc


@pytest.mark.slow
def test_sigterm_mid_epoch_stops_gracefully_and_resumes_to_the_uninterrupted_weights(isic_tiny, workdir, mlflow_uri):
    """``medhybrid pretrain`` sent SIGTERM (a scheduler's pre-emption) in the middle of an epoch: it writes a checkpoint
    at that iteration, marks its MLflow run KILLED and exits in one line; run again, it resumes there and ends with the
    weights of an uninterrupted run, bit for bit, in the same MLflow run, every epoch's loss logged once.
    (``kill -9`` at a checkpoint: the torchrun test below.)"""
    conf = workdir / "pretrain.yaml"
    data = apply_overrides({"dataset": str(isic_tiny), "mode": "hybrid"},
                           [*TINY_NET, *TINY_TRAIN, "train.epochs=3", "train.epoch_length=16"])
    conf.write_text(yaml.safe_dump(data))

    stopped = workdir / "stopped"
    proc = subprocess.Popen(_cli(conf, stopped, mlflow_uri), cwd=workdir, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list((stopped / "checkpoints").glob("*.pt")):  # epoch 1 done: the next iterations are mid-epoch
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("medhybrid: ")]
    at = max(int(p.stem.rsplit("_", 1)[1]) for p in (stopped / "checkpoints").glob("*.pt"))
    assert line.startswith(f"medhybrid: stopped by SIGTERM at iteration {at}, checkpoint ") and 16 < at < 48, line
    state = json.loads((stopped / "state.json").read_text())
    assert state["status"] == "stopped" and not (stopped / "model.pt").exists()
    run_id = state["mlflow_run_id"]
    c = mlflow_client(mlflow_uri)
    assert c.get_run(run_id).info.status == "KILLED"

    resumed = subprocess.run(_cli(conf, stopped, mlflow_uri), cwd=workdir, env=cli_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {stopped / 'checkpoints'}" in resumed.stderr and f"(iteration {at} of 48)" in resumed.stderr
    assert f"mlflow run {run_id}" in resumed.stdout

    straight = workdir / "straight"
    full = subprocess.run(_cli(conf, straight, mlflow_uri), cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    a = torch.load(stopped / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    assert _same_weights(a, b)  # bit for bit
    assert json.loads((stopped / "state.json").read_text())["status"] == "finished"

    runs = [r for r in _runs(c) if r.data.tags.get("medhybrid.folder") == str(stopped.resolve())]
    assert [r.info.run_id for r in runs] == [run_id]
    assert c.get_run(run_id).info.status == "FINISHED"
    assert sorted(s for s, _ in _history(c, run_id, "train_loss")) == [1, 2, 3]
    assert len(_runs(c)) == 2  # and one for the uninterrupted run


# --------------------------------------------------------------------------------------------- several processes
@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_two_processes(isic_tiny, pretrain_cfg, mlflow_uri):
    cfg = pretrain_cfg(isic_tiny, "hybrid", "train.nproc=2", "train.backend=gloo", "train.epochs=2", "train.epoch_length=2")
    res = run_pretraining(cfg)
    state = json.loads((cfg.folder / "state.json").read_text())
    assert state["status"] == "finished" and state["world_size"] == 2
    assert state["metrics"] == res.metrics and 0.0 <= res.metrics["val_dice"] <= 1.0
    assert sorted(p.name for p in (cfg.folder / "checkpoints").iterdir()) == ["pretrain_checkpoint_2.pt", "pretrain_checkpoint_4.pt"]
    ckpt = torch.load(cfg.folder / "checkpoints" / "pretrain_checkpoint_4.pt", weights_only=True)
    net, meta = load_model(res.checkpoint)
    assert not any(k.startswith("module.") for k in ckpt["network"])  # the unwrapped network, not DDP's
    assert _same_weights(ckpt["network"], net.state_dict())
    c = mlflow_client(mlflow_uri)
    runs = _runs(c)
    assert [r.info.run_id for r in runs] == [res.run_id]  # rank 0 only
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(c, res.run_id, "train_loss")] == [1, 2]  # logged once per epoch, not per rank
    assert artifact_paths(c, res.run_id) == ["config.yaml", "model.pt", "previews/epoch_001.png", "previews/epoch_002.png"]


# --------------------------------------------------------------------------------------------- torchrun
def _torchrun(config: Path, out: Path, mlflow_uri: str, n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            *_cli(config, out, mlflow_uri)[1:], "train.backend=gloo"]


def test_the_ranks_shards_are_the_single_process_draw():
    """Every rank draws the same seeded order and takes its share: together the ranks see exactly the images one
    process with the global batch sees, none repeated or dropped, for labelled and unlabelled sources alike."""
    from medhybrid.engines.batches import EpochSeededSampler, MixedBatchSampler

    one = EpochSeededSampler(10, 12, seed=3)
    ranks = [EpochSeededSampler(10, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1, 5):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        order = list(one)
        assert list(ranks[0]) == order[0::2] and list(ranks[1]) == order[1::2]
        assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(order)
    # labelled + unlabelled batches: global batch j goes to rank j % 2, whole, so the shards are the single draw's batches
    one = MixedBatchSampler(5, 7, (2, 2), num_batches=6, seed=4)
    ranks = [MixedBatchSampler(5, 7, (2, 2), num_batches=3, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = [list(one)[i : i + 4] for i in range(0, 24, 4)]
        for r in range(2):
            mine = list(ranks[r])
            assert [mine[i : i + 4] for i in range(0, 12, 4)] == batches[r::2]
        assert all(b[0] < 5 and b[1] < 5 and b[2] >= 5 and b[3] >= 5 for b in batches)  # 2 labelled, then 2 unlabelled


@pytest.mark.slow(seconds=70)
@pytest.mark.distributed
def test_torchrun_pretraining_writes_one_run_and_resumes_after_kill(isic_tiny, workdir, mlflow_uri):
    """``torchrun --nproc_per_node 2 -m medhybrid.cli pretrain`` (gloo): rank 0 alone writes the checkpoints, model.pt
    and one MLflow run; killed after its first checkpoint and launched again, it resumes and ends with the weights of
    an uninterrupted torchrun run, in the same MLflow run."""
    conf = workdir / "pretrain.yaml"
    data = apply_overrides({"dataset": str(isic_tiny), "mode": "hybrid"},
                           [*TINY_NET, *TINY_TRAIN, "train.epochs=6", "train.epoch_length=2", "train.batch_size=2"])
    conf.write_text(yaml.safe_dump(data))

    straight = workdir / "straight"
    full = subprocess.run(_torchrun(conf, straight, mlflow_uri), cwd=workdir, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-4000:]
    state = json.loads((straight / "state.json").read_text())
    assert state["status"] == "finished" and state["world_size"] == 2
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["pretrain_checkpoint_10.pt", "pretrain_checkpoint_12.pt"]
    c = mlflow_client(mlflow_uri)
    (run,) = _runs(c)
    assert run.info.status == "FINISHED" and [s for s, _ in _history(c, run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert full.stdout.count("pretraining done") == 2  # every rank returns the result

    killed = workdir / "killed"
    # the launcher and both ranks (torchrun starts each rank in a session of its own)
    _kill_at_first_checkpoint(_torchrun(conf, killed, mlflow_uri), workdir, killed,
                              _kill_tree)
    time.sleep(1)
    run_id = json.loads((killed / "state.json").read_text())["mlflow_run_id"]
    assert not (killed / "model.pt").exists() and json.loads((killed / "state.json").read_text())["status"] == "running"
    resumed = subprocess.run(_torchrun(conf, killed, mlflow_uri), cwd=workdir, env=cli_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {killed / 'checkpoints'}" in resumed.stderr and f"mlflow run {run_id}" in resumed.stdout, resumed.stderr[-3000:]
    a = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    assert _same_weights(a, b)
    runs = [r for r in _runs(c) if r.data.tags.get("medhybrid.folder") == str(killed.resolve())]
    assert [r.info.run_id for r in runs] == [run_id] and c.get_run(run_id).info.status == "FINISHED"
    assert len(_runs(c)) == 2
