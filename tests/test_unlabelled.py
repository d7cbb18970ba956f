"""medhybrid.data.unlabelled: image-only sources (folders searched recursively, DICOM without a suffix, CSVs of images, a
labelled dataset's split without its masks), their caches, mixed batches, and pretraining that uses them without ever
giving an unlabelled image a mask loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DICOM, OPENIST, PH2, TINY_NET, TINY_TRAIN, mlflow_client, ph2_yaml, real_split
from PIL import Image

from medhybrid.cli import main
from medhybrid.core.config import ConfigError, load_config, validate
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.data.unlabelled import (
    MixedDataset,
    UnlabelledConfig,
    UnlabelledSource,
    batch_split,
    mixed_batch,
    source_items,
    unlabelled_dataset,
)
from medhybrid.engines.batches import CorruptionPrepareBatch, MixedBatchSampler


@pytest.fixture
def pacs(data, tmp_path, write_dicom) -> Path:
    """A PACS-like export of grey chest X-rays: nested patient/study folders, DICOM files with and without ``.dcm``,
    JPEGs, a text file and a hidden file (neither is an image)."""
    root = tmp_path / "pacs"
    study = root / "patient1" / "study1"
    study.mkdir(parents=True)
    shutil.copy(DICOM / "nih_cxr14_dx_1024.dcm", study / "1.2.840.113619.2.55.3.1")  # a DICOM UID as its name
    grey = np.asarray(Image.open(OPENIST / "images" / "1-10.jpg").convert("L"))
    write_dicom(study / "IM0002.dcm", grey)
    write_dicom(root / "patient1" / "IM0003", grey[::2, ::2].copy())
    (root / "patient2").mkdir()
    for name in sorted(p.name for p in (OPENIST / "images").iterdir())[:3]:
        shutil.copy(OPENIST / "images" / name, root / "patient2" / name)
    (root / "patient2" / "notes.txt").write_text("exported 2026-11-01\n")
    (root / ".DS_Store").write_bytes(b"\0" * 64)
    return root


def test_folder_of_images_is_an_image_only_dataset_searched_recursively(pacs):
    from medhybrid.data.datasets import discover_pairs

    spec = load_dataset_spec(pacs)
    assert not spec.labelled and spec.channels == 1  # grey, read from the files: nobody had to say so
    skipped: list[str] = []
    items, problems = discover_pairs(spec, skipped)
    assert problems == []
    ids = sorted(i["id"] for i in items)
    assert ids == sorted(["patient1/study1/1.2.840.113619.2.55.3.1", "patient1/study1/IM0002", "patient1/IM0003",
                          *(f"patient2/{p.stem}" for p in (pacs / "patient2").glob("*.jpg"))])
    assert all("label" not in i for i in items)
    assert skipped == [str(pacs / "patient2" / "notes.txt")]  # the hidden file is not even listed


def test_data_check_of_an_image_only_folder(pacs, capsys):
    assert main(["data", "check", str(pacs)]) == 0
    out = capsys.readouterr().out
    assert "6 images (no masks)" in out and "formats: dicom 3, jpeg 3" in out
    assert "channels in files: 1: 6" in out and "skipped 1 file(s) that are not images" in out
    assert "no problems found" in out


def test_data_check_names_every_bad_unlabelled_file(pacs, capsys):
    (pacs / "patient2" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    (pacs / "patient1" / "truncated.dcm").write_bytes((DICOM / "nih_cxr14_dx_1024.dcm").read_bytes()[:4000])
    assert main(["data", "check", str(pacs)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS (2)" in out
    assert f"{pacs / 'patient2' / 'broken.jpg'}: cannot decode image" in out
    assert str(pacs / "patient1" / "truncated.dcm") in out


def test_empty_folder_and_folder_without_images_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", str(empty)]) == 2
    assert f"{empty}: no image files found (the folder is empty)" in capsys.readouterr().err
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "report.txt").write_text("no images here")
    (texts / "table.csv").write_text("a,b\n")
    assert main(["data", "check", str(texts)]) == 2
    err = capsys.readouterr().err
    assert "no image files found: 2 file(s) that are neither a supported image type nor DICOM" in err
    assert "report.txt" in err and "table.csv" in err
    # channels given: the check itself reports the folder and exits 1
    assert main(["data", "check", str(texts), "--set", "channels=1"]) == 1
    assert "no image files found" in capsys.readouterr().out


def test_channels_are_inferred_when_the_files_agree_and_asked_for_when_they_do_not(data, tmp_path, capsys):
    assert load_dataset_spec(PH2 / "images").channels == 3
    assert load_dataset_spec(OPENIST / "images").channels == 1
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(PH2 / "images" / "IMD002.png", mixed / "IMD002.png")
    shutil.copy(OPENIST / "images" / "1-10.jpg", mixed / "1-10.jpg")
    with pytest.raises(ConfigError, match=r"disagree on grey or RGB \(1 grey \(e\.g\. .*1-10\.jpg\); 1 RGB \(e\.g\. .*IMD002\.png\)\)"):
        load_dataset_spec(mixed)
    assert main(["data", "check", str(mixed)]) == 2
    assert "--set channels=N" in capsys.readouterr().err
    spec = load_dataset_spec(mixed, ["channels=3"])
    assert spec.channels == 3
    assert main(["data", "check", str(mixed), "--set", "channels=3"]) == 0


def test_csv_with_only_an_image_column_is_image_only(data, tmp_path, capsys):
    names = sorted(p.name for p in (OPENIST / "images").iterdir())[:4]
    csv_path = tmp_path / "archive.csv"
    csv_path.write_text("image\n" + "".join(f"{OPENIST / 'images' / n}\n" for n in names))
    spec = load_dataset_spec(csv_path)
    assert not spec.labelled and spec.channels == 1
    assert main(["data", "check", str(csv_path)]) == 0
    assert "4 images (no masks)" in capsys.readouterr().out


def test_a_labelled_split_is_used_without_its_masks_and_test_never(data):
    src = validate(UnlabelledSource, {"dataset": "ph2", "splits": ["pool"]})
    items = source_items(src)
    split = real_split(PH2)
    assert sorted(Path(i["image"]).stem for i in items) == sorted(split["pool"])
    assert not {Path(i["image"]).stem for i in items} & set(split["test"])
    assert all(set(i) == {"image", "stamp"} for i in items)  # never a mask path
    with pytest.raises(ConfigError, match="held out for testing"):
        validate(UnlabelledSource, {"dataset": "ph2", "splits": ["pool", "test"]})
    with pytest.raises(ConfigError, match="name the splits"):
        validate(UnlabelledSource, {"dataset": "ph2"})


def test_batch_split():
    assert batch_split(16, 0.5) == (8, 8)
    assert batch_split(16, 0.25) == (12, 4)
    assert batch_split(4, 0.01) == (3, 1)  # a share above 0 always brings one image
    assert batch_split(4, 1.0) == (0, 4)
    assert mixed_batch(16, 0.5, beside=False) == (8, 8) and mixed_batch(16, 0.5, beside=True) == (16, 16)
    assert mixed_batch(16, 0.25, beside=True) == (16, 5) and mixed_batch(4, 1.0, beside=True) == (0, 4)


def test_mixed_batches_hold_the_share_and_ranks_never_repeat_an_index():
    nl, nu, per, batches = 40, 24, (3, 1), 5
    one = list(MixedBatchSampler(nl, nu, per, batches, seed=3))
    assert len(one) == batches * 4
    for b in range(batches):
        chunk = one[b * 4 : (b + 1) * 4]
        assert all(i < nl for i in chunk[:3]) and nl <= chunk[3] < nl + nu
    ranks = [list(MixedBatchSampler(nl, nu, per, batches, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == batches * 4
    assert not set(ranks[0]) & set(ranks[1])  # 30 labelled and 10 unlabelled draws per epoch: no repeats
    s = MixedBatchSampler(nl, nu, per, batches, seed=3)
    s.set_epoch(1)
    first = list(s)
    assert first == list(s)  # a function of (seed, epoch): a resumed run sees the same batches
    s.set_epoch(2)
    assert list(s) != first
    with pytest.raises(ValueError, match="need both kinds"):
        MixedBatchSampler(0, nu, per, batches)


def test_unlabelled_samples_get_no_mask_weight_and_no_low_band():
    torch.manual_seed(0)
    b = 16
    labelled = torch.tensor([1.0] * 8 + [0.0] * 8)
    batch = {"image": torch.rand(b, 3, 16, 16) * 2 - 1, "label": torch.zeros(b, 1, 16, 16), "labelled": labelled}
    prep = CorruptionPrepareBatch("hybrid", seed=1, mask_weight=3.0, seg_fraction=0.5, seg_sigma_max=0.1, weighting="all")
    for step in range(20):
        prep.step = step
        _, tgt, _, _ = prep(batch)
        w, sigma = tgt["mask_weight"], tgt["sigma"]
        assert torch.equal(w[8:], torch.zeros(8)) and torch.equal(w[:8], torch.full((8,), 3.0))
        assert bool((sigma[:4] <= 0.1 + 1e-6).all())  # the low band goes to half of the labelled samples
        assert torch.equal(tgt["labelled"], labelled)
    # all labelled: exactly the batches of a run without unlabelled images
    prep.step = 5
    plain = prep({"image": batch["image"], "label": batch["label"]})
    flagged = prep({**batch, "labelled": torch.ones(b)})
    assert torch.equal(plain[1]["sigma"], flagged[1]["sigma"]) and torch.equal(plain[0], flagged[0])


def test_mixed_dataset_items_collate(data):
    labelled = [{"image": torch.rand(3, 8, 8), "label": torch.ones(1, 8, 8)}]
    unl = [{"image": torch.rand(3, 8, 8)}, {"image": torch.rand(3, 8, 8)}]
    ds = MixedDataset(labelled, unl)
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch["labelled"].tolist() == [1.0, 0.0, 0.0]
    assert bool((batch["label"][1:] == -1).all()) and bool((batch["label"][0] == 1).all())


def test_disk_cache_decodes_once_and_matches_memory(pacs, tmp_path):
    pre = Preprocess(resolution=32)
    cfg = validate(UnlabelledConfig, {"sources": [str(pacs)], "cache": "disk", "cache_dir": str(tmp_path / "cache")})
    disk = unlabelled_dataset(cfg, 1, pre)
    memory = unlabelled_dataset(cfg.model_copy(update={"cache": "memory"}), 1, pre)
    assert len(disk) == len(memory) == 6
    for i in range(6):
        assert torch.allclose(torch.as_tensor(disk[i]["image"]), torch.as_tensor(memory[i]["image"]))
        assert tuple(disk[i]["image"].shape) == (1, 32, 32)
    folder = next((tmp_path / "cache").iterdir())
    assert len(list(folder.glob("*.pt"))) == 6
    # a changed file is decoded again, not served stale
    jpg = next((pacs / "patient2").glob("*.jpg"))
    Image.open(jpg).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(jpg)
    again = unlabelled_dataset(cfg, 1, pre)
    [again[i] for i in range(6)]
    assert len(list(folder.glob("*.pt"))) == 7
    # auto: memory while the arrays fit the limit, disk above it
    auto = cfg.model_copy(update={"cache": "auto", "memory_limit_mb": 0.01})
    assert type(unlabelled_dataset(auto, 1, pre)).__name__ == "PersistentDataset"


# --------------------------------------------------------------------------------------------- pretraining
def _pretrain_argv(mlflow_uri: str, *overrides: str) -> list[str]:
    """``medhybrid pretrain`` on the shipped ISIC 2018 config, shrunk to the tiny U-Net and schedule of the tests."""
    return ["pretrain", "--config", "isic2018", *TINY_NET, *TINY_TRAIN, f"mlflow.tracking_uri={mlflow_uri}", *overrides]


@pytest.mark.parametrize("mode", ["diffusion", "mdm"])
def test_cli_pretrains_from_a_folder_of_unlabelled_images_alone(mode, pacs, workdir, mlflow_uri, capsys):
    out = workdir / f"run-{mode}"
    rc = main(_pretrain_argv(mlflow_uri, f"mode={mode}", "dataset=null", f"unlabelled.sources=[{pacs}]", f"output_dir={out}",
                             "train.check_data=true"))
    assert rc == 0
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["meta"]["mode"] == mode and ckpt["meta"]["image_channels"] == 1 and ckpt["meta"]["dataset"] == "pacs"
    assert ckpt["meta"]["num_classes"] == 2
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "finished" and state["metrics"]["val_recon_mse"] > 0
    run = mlflow_client(mlflow_uri).get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["medhybrid.data.unlabelled"] == "pacs"
    assert "train_loss" in run.data.metrics


@pytest.mark.parametrize("beside", [False, True])
def test_hybrid_with_the_target_pool_never_gives_an_unlabelled_image_a_mask_loss(beside, isic_tiny, workdir, mlflow_uri,
                                                                              monkeypatch):
    """At share 0.25 of a batch of 4: 3 labelled and 1 unlabelled image; ``beside``, a full labelled batch of 4 and
    1 unlabelled image beside it (as many masks seen as without the target's images). Never a mask loss on one."""
    target = ph2_yaml(workdir / "datasets", n_pool=8, n_test=4)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = CorruptionPrepareBatch.__call__

    def record(self, batchdata, *a, **kw):
        out = original(self, batchdata, *a, **kw)
        seen.append((out[1]["labelled"].clone(), out[1]["mask_weight"].clone(), batchdata["image"].clone()))
        return out

    monkeypatch.setattr(CorruptionPrepareBatch, "__call__", record)
    out = workdir / "hybrid-target"
    rc = main(_pretrain_argv(mlflow_uri, "mode=hybrid", f"dataset={isic_tiny}",
                             f"unlabelled={{sources: [{{dataset: {target}, splits: [pool]}}], share: 0.25, beside: {beside}}}",
                             f"output_dir={out}"))
    assert rc == 0
    assert len(seen) == 16  # 4 epochs x 4 iterations
    n = 4 if beside else 3
    pool = {Path(p).stem for p in real_split(PH2)["pool"][:8]}
    assert len(pool) == 8
    for labelled, weight, _ in seen:
        assert labelled.tolist() == [1.0] * n + [0.0]
        assert float(weight[n]) == 0.0 and bool((weight[:n] > 0).all())
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["meta"]["dataset"] == "isic_tiny+ph2_tiny-pool" and ckpt["meta"]["num_classes"] == 2
    state = json.loads((out / "state.json").read_text())
    assert 0 < state["metrics"]["val_dice"] <= 1
    run = mlflow_client(mlflow_uri).get_run(state["mlflow_run_id"])
    assert run.data.params["unlabelled.share"] == "0.25"


def test_pretrain_config_rules(isic_tiny, pacs, workdir):
    from medhybrid.core.runs import config_hash
    from medhybrid.workflows.pretrain import PretrainConfig

    base = [*TINY_NET, *TINY_TRAIN]
    with pytest.raises(ConfigError, match="cannot use unlabelled images"):
        load_config(PretrainConfig, None, [*base, "mode=supervised", f"dataset={isic_tiny}", f"unlabelled.sources=[{pacs}]"])
    with pytest.raises(ConfigError, match="needs unlabelled.sources and mode diffusion or mdm"):
        load_config(PretrainConfig, None, [*base, "mode=hybrid", "dataset=null", f"unlabelled.sources=[{pacs}]"])
    with pytest.raises(ConfigError, match="share must be below 1"):
        load_config(PretrainConfig, None, [*base, f"dataset={isic_tiny}", f"unlabelled.sources=[{pacs}]", "unlabelled.share=1"])
    with pytest.raises(ConfigError, match="target dataset"):
        load_config(PretrainConfig, None, [*base, "dataset=ph2"])
    with pytest.raises(ConfigError, match="has no masks"):
        load_config(PretrainConfig, None, [*base, f"dataset={pacs}"])
    plain = load_config(PretrainConfig, None, [*base, f"dataset={isic_tiny}"])
    empty = load_config(PretrainConfig, None, [*base, f"dataset={isic_tiny}", "unlabelled.share=0.3"])
    assert empty.unlabelled is None and config_hash(empty) == config_hash(plain)  # shared settings, no sources
    mixed = load_config(PretrainConfig, None, [*base, f"dataset={isic_tiny}", f"unlabelled.sources=[{pacs}]"])
    disk = load_config(PretrainConfig, None, [*base, f"dataset={isic_tiny}", f"unlabelled.sources=[{pacs}]", "unlabelled.cache=disk"])
    assert config_hash(mixed) != config_hash(plain) and config_hash(disk) == config_hash(mixed)
