"""medhybrid.workflows.inference and ``medhybrid infer``: image files in (PNG, DICOM ...), masks of the input's exact size out,
made with the model's own preprocessing; the same masks that evaluation scores."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PH2, REPO_ROOT, ph2_yaml, real_split
from conftest import TINY_UNET as TINY
from PIL import Image

from medhybrid.cli import main
from medhybrid.core.config import ConfigError, validate
from medhybrid.data.io import DataError, read_image
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks.checkpoints import network_meta, save_model
from medhybrid.networks.nets import build_network
from medhybrid.workflows.evaluate import binary_metrics, evaluate
from medhybrid.workflows.finetune import FinetuneConfig, run_finetuning
from medhybrid.workflows.inference import (
    InferenceConfig,
    Segmenter,
    collect_inputs,
    infer_files,
    infer_folder,
    load_segmenter,
    run_inference,
)

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
    written = infer_files(model_pt, [ph2_pair[0], dcm], out, nifti=True).written
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
    assert sorted(p.name for p in out.iterdir()) == ["IMD002_mask.png", "quality.csv"]


def test_same_pixels_as_png_and_dicom_give_the_same_mask(model_pt, tmp_path, write_dicom, write_png, grey_pixels):
    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "a.png", grey_pixels)
    write_dicom(src / "b.dcm", grey_pixels)
    (src / "notes.txt").write_text("not an image")  # a folder's other files are skipped
    written = infer_folder(model_pt, src, tmp_path / "out", batch_size=1).written
    assert [p.name for p in written] == ["a_mask.png", "b_mask.png"]
    np.testing.assert_array_equal(_mask(written[0]), _mask(written[1]))


def test_masks_are_what_evaluation_scores(model_pt, tmp_path):
    """The inference path (files -> preprocessing from model.pt -> segment -> native size -> threshold) gives the
    masks that :func:`medhybrid.workflows.evaluate.evaluate` scores: per-image Dice and IoU computed from the written PNGs
    against the real PH2 masks equal the evaluation's, in one batch or several."""
    test_ids = real_split(PH2)["test"][:2]
    images = [PH2 / "images" / f"{i}.png" for i in test_ids]
    written = infer_files(model_pt, images, tmp_path / "masks", batch_size=2).written
    one_by_one = infer_files(model_pt, images, tmp_path / "masks1", batch_size=1).written
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
    (png,) = infer_files(model, [ph2_pair[0]], tmp_path / "out", nifti=True).written
    arr = _mask(png)
    assert arr.shape == (287, 384) and set(np.unique(arr)) == {2}
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "IMD002_mask.nii.gz", role="mask")[0], arr)


# --------------------------------------------------------------------------------------------- errors
def test_a_folder_with_bad_files_gives_every_good_mask_and_one_line_per_bad_file(model_pt, tmp_path, data, caplog):
    """Good images (a PNG, a real DICOM) beside a truncated JPEG, a text file named .png, random bytes named .png,
    a DICOM cut short and a DICOM without pixel data: every good image gets its mask, each bad file one log line
    naming it and the reason, the CSV lists it as unreadable, and nothing raises."""
    import pydicom

    src = tmp_path / "in"
    src.mkdir()
    good = [PH2 / "images" / f"{real_split(PH2)['test'][0]}.png", data / "dicom" / "nih_cxr14_dx_1024.dcm"]
    for f in good:
        (src / f.name).write_bytes(f.read_bytes())
    jpeg = src / "photo.jpg"
    Image.open(good[0]).convert("RGB").save(jpeg, quality=90)
    (src / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 3])
    (src / "notes.png").write_text("a text file, not an image")
    (src / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (src / "cut.dcm").write_bytes(good[1].read_bytes()[:4000])
    ds = pydicom.dcmread(good[1])
    del ds.PixelData
    ds.save_as(src / "nopixels.dcm")
    bad = {"truncated.jpg": "truncated", "notes.png": "cannot decode image", "noise.png": "cannot decode image",
           "cut.dcm": "pixel data", "nopixels.dcm": "no pixel data"}
    with caplog.at_level("INFO", logger="medhybrid"):
        res = infer_files(model_pt, [src], tmp_path / "out", batch_size=2)
    assert sorted(p.name for p in res.written) == sorted(["nih_cxr14_dx_1024_mask.png", "photo_mask.png",
                                                          f"{good[0].stem}_mask.png"])
    assert sorted(Path(f).name for f, _ in res.failures) == sorted(bad)
    for name, why in bad.items():
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage() and r.levelname == "ERROR"]
        assert len(lines) == 1 and why in lines[0] and "\n" not in lines[0], (name, lines)
    assert "3 of 8 image(s) segmented, 5 could not be read" in res.summary
    rows = list(csv.DictReader(open(res.quality_csv)))
    assert [r["status"].startswith("unreadable") for r in rows] == [True] * 5 + [False] * 3


def test_cli_exits_1_with_a_summary_and_no_traceback(model_pt, tmp_path, capsys, ph2_pair):
    src = tmp_path / "in"
    src.mkdir()
    (src / ph2_pair[0].name).write_bytes(ph2_pair[0].read_bytes())
    (src / "bad.dcm").write_bytes(b"\x00" * 64)
    assert main(["infer", "--model", str(model_pt), "--input", str(src), "--output", str(tmp_path / "out")]) == 1
    out = capsys.readouterr()
    assert "1 of 2 image(s) segmented, 1 could not be read" in out.out and "Traceback" not in out.out + out.err
    assert (tmp_path / "out" / "IMD002_mask.png").is_file()


def test_a_full_disk_stops_inference_in_one_line_and_leaves_no_partial_mask(model_pt, tmp_path, capsys, ph2_pair,
                                                                            monkeypatch):
    """A mask write that finds the disk full (simulated on the second mask) stops the command at once, one ``error:``
    line, exit 2: it does not go on image after image. The first mask is whole; nothing half-written is left."""
    import errno

    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (src / name).write_bytes(ph2_pair[0].read_bytes())
    real_save = Image.Image.save
    saves = []

    def save(self, fp, *a, **kw):
        saves.append(fp)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(model_pt), "--input", str(src), "--output", str(out), "--no-quality"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on device writing ") and "b_mask.png" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png"]
    assert _mask(out / "a_mask.png").shape == (287, 384)


@pytest.mark.parametrize("kind", ["garbage", "pickled object", "foreign weights", "bundle weights"])
def test_a_model_file_that_is_not_a_model_is_one_line_without_weights_only_advice(kind, model_pt, tmp_path, capsys, ph2_pair):
    path = tmp_path / "model.pt"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 10000, dtype=np.uint8).tobytes())
    elif kind == "pickled object":  # e.g. a whole pickled model: loading it could run code
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
    elif kind == "foreign weights":  # another tool's model.pt with metadata of its own
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "meta": {"arch": "resnet"}}, path)
    else:
        path = REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation" / "models" / "model.pt"
    assert main(["infer", "--model", str(path), "--input", str(ph2_pair[0]), "--output", str(tmp_path / "out")]) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in out.err
    assert "weights_only=False" not in out.err + out.out and "weights_only = False" not in out.err
    assert not (tmp_path / "out").exists()
    if kind == "bundle weights":
        assert "bundle's folder" in lines[0]


def test_a_bundle_folder_is_a_model(tmp_path, ph2_pair):
    """``--model <bundle>``: the bundle's network and preprocessing (its configs/inference.json), its weights."""
    res = infer_files(REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation", [ph2_pair[0]], tmp_path / "out")
    truth = np.asarray(Image.open(ph2_pair[1])) > 0
    pred = _mask(res.written[0]) > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.8


def test_camera_size_jpeg_is_decoded_reduced_and_masked_at_full_size(model_pt, tmp_path, ph2_pair):
    """A 2000x1500 JPEG (a PH2 image upscaled) is decoded at a quarter of its size (the 32-pixel model's short side
    stays >= 128); its mask has the file's size and matches the mask of a full decode within Dice 0.98."""
    from medhybrid.workflows.inference import inference_preprocessing, load_segmenter

    big = tmp_path / "camera.jpg"
    Image.open(ph2_pair[0]).convert("RGB").resize((2000, 1500), Image.BICUBIC).save(big, quality=92)
    res = infer_files(model_pt, [big], tmp_path / "out")
    mask = _mask(res.written[0]) > 0
    assert mask.shape == (1500, 2000)
    _, meta = load_segmenter(model_pt)
    pre = inference_preprocessing(3, Preprocess(**meta["preprocess"]))
    read = pre.transforms[0]({"image": str(big)})["image"]
    assert tuple(read.shape[1:]) == (188, 250)  # 4 x 32 = 128 <= 187: eighth-size draft decoding (rounded up)
    assert tuple(pre({"image": str(big)})["image"].applied_operations[0]["orig_size"]) == (1500, 2000)
    full = _mask(infer_files(model_pt, [big], tmp_path / "full", reduce=False).written[0]) > 0
    assert 0.05 < full.mean() < 0.95
    assert 2 * (mask & full).sum() / (mask.sum() + full.sum()) > 0.98


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
    res = infer_files(model_pt, [tmp_path / "notes.txt"], tmp_path / "out")  # named explicitly: read, and reported
    assert res.written == [] and "unsupported file type '.txt'" in res.failures[0][1]
    with pytest.raises(DataError, match="nope.pt: model file not found"):
        infer_files(tmp_path / "nope.pt", [tmp_path / "same.png"], tmp_path / "out")


def test_inference_config(model_pt, tmp_path, ph2_pair):
    """The typed entry point (for apps): a config validated up front, its inputs files and/or folders."""
    cfg = validate(InferenceConfig, {"model": str(model_pt), "input": [str(ph2_pair[0])], "output_dir": str(tmp_path / "out"),
                                     "batch_size": 2, "device": "cpu"})
    assert run_inference(cfg).written == [tmp_path / "out" / "IMD002_mask.png"]
    with pytest.raises(ConfigError, match="batch_size"):
        validate(InferenceConfig, {"model": "m.pt", "input": ["x.png"], "output_dir": "o", "batch_size": 0})


# --------------------------------------------------------------------------------------------- CLI
def test_cli_infer_folder_and_files(model_pt, tmp_path, capsys, write_dicom, grey_pixels, ph2_pair):
    src = tmp_path / "in"
    src.mkdir()
    write_dicom(src / "scan.dcm", grey_pixels)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(model_pt), "--input", str(src), str(ph2_pair[0]), "--output", str(out), "--nifti"]) == 0
    assert "2 of 2 image(s) segmented; 2 mask(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["IMD002_mask.nii.gz", "IMD002_mask.png", "quality.csv",
                                                     "scan_mask.nii.gz", "scan_mask.png", "scan_seg.dcm"]
    assert _mask(out / "scan_mask.png").shape == grey_pixels.shape
