"""medhybrid.networks.checkpoints: model files, training checkpoints and weight transfer by name and shape."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET as TINY

from medhybrid.data.io import DataError
from medhybrid.data.specs import Preprocess
from medhybrid.networks.checkpoints import (
    atomic_save,
    interpolate_weights,
    latest_checkpoint,
    load_model,
    network_meta,
    read_model_file,
    save_model,
    transfer_weights,
)
from medhybrid.networks.nets import ModelConfig, build_network

pytestmark = pytest.mark.usefixtures("workdir")


def test_atomic_save_and_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (9, 10, 2):
        atomic_save({"step": torch.tensor(step)}, tmp_path / "checkpoints" / f"train_checkpoint_{step}.pt")
    (tmp_path / "checkpoints" / "notes.pt").write_text("not a checkpoint")
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "train_checkpoint_10.pt"  # by number, not by name (9 < 10)
    assert torch.load(latest, weights_only=True)["step"].item() == 10
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------- weight transfer
def test_transfer_weights_by_name_and_shape():
    """A 3-class checkpoint into a binary network: everything but the output convolution is copied; the head keeps its
    initial values and is reported."""
    torch.manual_seed(0)
    src = build_network(TINY, 3, num_classes=3)  # 3-class head: 3 + 3 output channels
    torch.manual_seed(1)
    dst = build_network(TINY, 3, num_classes=2)  # binary head: 3 + 1
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = dict(src.state_dict())
    report = transfer_weights(dst, sd, "src.pt")
    after = dst.state_dict()
    head = {k for k, v in src.state_dict().items() if v.shape != after[k].shape}
    assert head and all(k.startswith("backbone.out") for k in head)  # only the output convolution differs
    assert set(report["skipped"]) == head and report["missing"] == []
    for k in head:
        assert report["skipped"][k] == f"shape {tuple(sd[k].shape)} in src.pt, {tuple(after[k].shape)} in the network"
        assert torch.equal(after[k], before[k])  # left at its initial value
    assert set(report["loaded"]) == set(sd) - head
    assert all(torch.equal(after[k], sd[k]) for k in report["loaded"])


def test_transfer_weights_fails_on_anything_but_the_head():
    """A tensor the network lacks, or one the checkpoint lacks, outside the head: another architecture, refused,
    with every offending name; the network is left untouched."""
    dst = build_network(TINY, 3, num_classes=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = dict(build_network(TINY, 3, num_classes=2).state_dict())
    sd["extra.weight"] = torch.zeros(2)
    del sd["backbone.time_embed.0.bias"]
    with pytest.raises(DataError, match=r"src\.pt: does not fit the network outside its output head \(2 tensor"):
        transfer_weights(dst, sd, "src.pt")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    other = build_network(TINY.model_copy(update={"channels": (16, 32, 64)}), 3, 2).state_dict()
    with pytest.raises(DataError, match="shape"):
        transfer_weights(dst, other, "wide.pt")


def test_transfer_weights_logs_what_is_skipped(caplog):
    dst = build_network(TINY, 3, 2)
    src = build_network(TINY, 3, 3).state_dict()
    with caplog.at_level("WARNING", logger="medhybrid"):
        transfer_weights(dst, src, "ck.pt")
    assert any("SKIPPED backbone.out" in r.getMessage() and "ck.pt" in r.getMessage() for r in caplog.records)


def test_model_file_round_trip(tmp_path):
    """A model file holds plain tensors and values (loads with ``weights_only=True``), describes itself, and rebuilds the
    same network; a network of another size refuses its weights."""
    torch.manual_seed(0)
    net = build_network(TINY, 3, 2)
    meta = network_meta(net, TINY, Preprocess(resolution=32, aspect="pad"), "ph2", "hybrid", num_classes=2)
    path = save_model(net, meta, tmp_path / "run" / "model.pt")
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # written atomically: no temporary left
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"} and raw["meta"] == meta == read_model_file(path)["meta"]
    assert meta["image_channels"] == 3 and meta["mask_channels"] == 1 and meta["preprocess"]["resolution"] == 32
    again, meta2 = load_model(path)
    assert meta2 == meta and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))
    bigger = build_network(ModelConfig(**{**TINY.model_dump(), "channels": (32, 64, 64)}), 3, 2)
    with pytest.raises(RuntimeError):
        bigger.load_state_dict(raw["state_dict"])


def test_interpolation_is_eq_1_of_wise_ft():
    a = {"w": torch.zeros(2, 2), "steps": torch.tensor(3)}
    b = {"w": torch.ones(2, 2) * 4, "steps": torch.tensor(7)}
    assert torch.equal(interpolate_weights(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_weights(a, b, 1.0)["w"], b["w"])
    mid = interpolate_weights(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.ones(2, 2)) and mid["steps"].item() == 7  # integer buffers: the fine-tuned
    with pytest.raises(ValueError, match="differ in 1 tensor"):
        interpolate_weights(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_weights(a, {"w": torch.ones(3), "steps": b["steps"]}, 0.5)
