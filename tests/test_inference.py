"""medhybrid.inference and ``medhybrid infer``: image files in (PNG, DICOM ...), masks of the input's exact size out,
made with the model's own preprocessing; the same masks that evaluation scores."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import PH2, REPO_ROOT, ph2_yaml, real_split
from conftest import TINY_UNET as TINY
from PIL import Image

from medhybrid.checkpoints import network_meta, save_model
from medhybrid.cli import main
from medhybrid.config import ConfigError, Preprocess, load_dataset_spec, validate
from medhybrid.evaluate import binary_metrics, evaluate
from medhybrid.finetune import FinetuneConfig, run_finetuning
from medhybrid.inference import (
    InferenceConfig,
    Segmenter,
    collect_inputs,
    infer_files,
    infer_folder,
    load_segmenter,
    run_inference,
)
from medhybrid.io import DataError, read_image
from medhybrid.networks import build_network

pytestmark = pytest.mark.usefixtures("workdir")


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory, data):
    """A tiny U-Net fine-tuned from scratch for 8 iterations on 4 real PH2 pool images (32 px, pad): it already
    marks part of each image as lesion, so its masks are not trivially empty."""
    root = tmp_path_factory.mktemp("inference_model")
    cfg = {"dataset": str(ph2_yaml(root / "datasets", n_pool=4, n_test=2)), "budget": 4, "seed": 0, "output_dir": str(root / "ft"),
           "preprocess": {"resolution": 32, "aspect": "pad"}, "model": {"channels": [16, 32, 32], "attention_levels": [False] * 3},
           "train": {"batch_size": 4, "lr": 3e-3, "warmup_iterations": 0, "device": "cpu", "check_data": False, "progress": False},
           "schedule": {"per_label": 1, "min_iterations": 8, "max_iterations": 8, "epochs": 1}, "augment": {"enabled": False},
           "mlflow": {"enabled": False}}
    return run_finetuning(validate(FinetuneConfig, cfg)).checkpoint


def _mask(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def test_segmenter_is_the_hybrid_unet_segment_head():
    torch.manual_seed(0)
    net = build_network(TINY, 3, 2).eval()
    seg = Segmenter.wrap(net).eval()
    assert seg.state_dict().keys() == net.state_dict().keys()  # a model.pt loads into either
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(seg(x), net.segment(x))


def test_masks_have_the_input_size_png_and_dicom(model_pt, tmp_path, write_dicom, grey_pixels, ph2_pair):
    """A non-square RGB PNG (PH2, 287x384) and a grey DICOM from real pixels (40x72): one mask each, of exactly the
    input's HxW, 0/255 in a uint8 PNG; the NIfTI (asked for) holds the same mask as class indices."""
    dcm = write_dicom(tmp_path / "xray.dcm", grey_pixels)
    out = tmp_path / "masks"
    written = infer_files(model_pt, [ph2_pair[0], dcm], out, nifti=True)
    assert written == [out / "IMD002_mask.png", out / "xray_mask.png"]
    for src, png in zip([ph2_pair[0], dcm], written, strict=True):
        arr = _mask(png)
        assert arr.shape == read_image(src)[0].shape[:2]
        assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 255}
        nii = png.with_name(png.name.replace(".png", ".nii.gz"))
        assert nii.is_file()
        np.testing.assert_array_equal(read_image(nii, role="mask")[0], arr // 255)
    assert _mask(written[0]).shape == (287, 384)
    assert len({0, 255} & set(np.unique(_mask(written[0])))) == 2  # the trained model finds lesion and skin


def test_no_nifti_unless_asked(model_pt, tmp_path, ph2_pair):
    out = tmp_path / "masks"
    infer_files(model_pt, [ph2_pair[0]], out)
    assert sorted(p.name for p in out.iterdir()) == ["IMD002_mask.png"]


def test_same_pixels_as_png_and_dicom_give_the_same_mask(model_pt, tmp_path, write_dicom, write_png, grey_pixels):
    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "a.png", grey_pixels)
    write_dicom(src / "b.dcm", grey_pixels)
    (src / "notes.txt").write_text("not an image")  # a folder's other files are skipped
    written = infer_folder(model_pt, src, tmp_path / "out", batch_size=1)
    assert [p.name for p in written] == ["a_mask.png", "b_mask.png"]
    np.testing.assert_array_equal(_mask(written[0]), _mask(written[1]))


def test_masks_are_what_evaluation_scores(model_pt, tmp_path):
    """The inference path (files -> preprocessing from model.pt -> segment -> native size -> threshold) gives the
    masks that :func:`medhybrid.evaluate.evaluate` scores: per-image Dice and IoU computed from the written PNGs
    against the real PH2 masks equal the evaluation's, in one batch or several."""
    test_ids = real_split(PH2)["test"][:2]
    images = [PH2 / "images" / f"{i}.png" for i in test_ids]
    written = infer_files(model_pt, images, tmp_path / "masks", batch_size=2)
    one_by_one = infer_files(model_pt, images, tmp_path / "masks1", batch_size=1)
    for a, b in zip(written, one_by_one, strict=True):
        np.testing.assert_array_equal(_mask(a), _mask(b))

    net, meta = load_segmenter(model_pt)
    spec = load_dataset_spec(ph2_yaml(tmp_path / "datasets", n_pool=4, n_test=2))
    res = evaluate(net, spec, Preprocess(**meta["preprocess"]), "test", out_dir=tmp_path / "eval")
    assert res.summary["test_images"] == 2 and 0 <= res.summary["test_dice"] <= 1
    with open(tmp_path / "eval" / "per_image.csv") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    for i, png in zip(test_ids, written, strict=True):
        pred = torch.as_tensor(_mask(png) > 0).long()
        truth = torch.as_tensor(np.asarray(Image.open(PH2 / "masks" / f"{i}_lesion.png")) > 0).long()
        m = binary_metrics(pred, truth)
        assert m["dice"] == pytest.approx(float(rows[i]["dice"]), abs=1e-9)
        assert m["iou"] == pytest.approx(float(rows[i]["iou"]), abs=1e-9)
        assert 0 < m["dice"] < 1


def test_multiclass_model_writes_class_indices(tmp_path, ph2_pair):
    torch.manual_seed(0)
    net = build_network(TINY, 3, num_classes=3)
    with torch.no_grad():
        net.backbone.out[-1].conv.bias[3:] = torch.tensor([0.0, 0.0, 50.0])  # class 2 everywhere
    meta = network_meta(net, TINY, Preprocess(resolution=32), load_dataset_spec("ph2"), "none")
    meta["num_classes"] = 3
    model = save_model(net, meta, tmp_path / "m3.pt")
    (png,) = infer_files(model, [ph2_pair[0]], tmp_path / "out", nifti=True)
    arr = _mask(png)
    assert arr.shape == (287, 384) and set(np.unique(arr)) == {2}
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "IMD002_mask.nii.gz", role="mask")[0], arr)


# --------------------------------------------------------------------------------------------- errors
def test_corrupt_file_is_named(model_pt, tmp_path, ph2_pair):
    bad = tmp_path / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        infer_files(model_pt, [ph2_pair[0], bad], tmp_path / "out")


def test_dicom_without_pixels_is_named(model_pt, tmp_path, data):
    import pydicom

    ds = pydicom.dcmread(data / "dicom" / "nih_cxr14_dx_1024.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(DataError, match=r"empty\.dcm: DICOM file has no pixel data"):
        infer_files(model_pt, [tmp_path / "empty.dcm"], tmp_path / "out")


def test_input_problems(model_pt, tmp_path, write_png, grey_pixels):
    with pytest.raises(DataError, match="not found"):
        infer_files(model_pt, [tmp_path / "missing.png"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files found"):
        infer_folder(model_pt, tmp_path / "empty", tmp_path / "out")
    write_png(tmp_path / "same.png", grey_pixels)
    write_png(tmp_path / "same.jpg", grey_pixels)
    with pytest.raises(DataError, match="both would write same_mask.png"):
        collect_inputs([tmp_path / "same.png", tmp_path / "same.jpg"])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        infer_files(model_pt, [tmp_path / "notes.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="nope.pt: model file not found"):
        infer_files(tmp_path / "nope.pt", [tmp_path / "same.png"], tmp_path / "out")


def test_inference_config(model_pt, tmp_path, ph2_pair):
    """The typed entry point (for apps): a config validated up front, its inputs files and/or folders."""
    cfg = validate(InferenceConfig, {"model": str(model_pt), "input": [str(ph2_pair[0])], "output_dir": str(tmp_path / "out"),
                                     "batch_size": 2, "device": "cpu"})
    assert run_inference(cfg) == [tmp_path / "out" / "IMD002_mask.png"]
    with pytest.raises(ConfigError, match="batch_size"):
        validate(InferenceConfig, {"model": "m.pt", "input": ["x.png"], "output_dir": "o", "batch_size": 0})


# --------------------------------------------------------------------------------------------- CLI
def test_cli_infer_folder_and_files(model_pt, tmp_path, capsys, write_dicom, grey_pixels, ph2_pair):
    src = tmp_path / "in"
    src.mkdir()
    write_dicom(src / "scan.dcm", grey_pixels)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(model_pt), "--input", str(src), str(ph2_pair[0]), "--output", str(out), "--nifti"]) == 0
    assert "2 mask(s) written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["IMD002_mask.nii.gz", "IMD002_mask.png", "scan_mask.nii.gz", "scan_mask.png"]
    assert _mask(out / "scan_mask.png").shape == grey_pixels.shape


def test_cli_infer_corrupt_file_exits_2(model_pt, tmp_path, capsys):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 64)
    assert main(["infer", "--model", str(model_pt), "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.dcm" in err and "error:" in err


def test_cli_infer_on_bundle_weights_says_how_to_run_the_bundle(tmp_path, capsys, ph2_pair):
    """A bundle's weights file is a plain state dict: ``medhybrid infer`` names it and says how to run a bundle."""
    weights = REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation" / "models" / "model.pt"
    assert main(["infer", "--model", str(weights), "--input", str(ph2_pair[0]), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "monai.bundle run" in err and not (tmp_path / "out").exists()
