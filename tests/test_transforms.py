"""medhybrid.data.transforms: channels, masks to labels, intensity, resizing and the shipped preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from medhybrid.data import transforms as ts
from medhybrid.data.io import DataError
from medhybrid.data.specs import MaskSpec, Preprocess, load_dataset_spec
from medhybrid.data.transforms import (
    IGNORE_INDEX,
    LoadImage2D,
    LoadImage2Dd,
    MaskToLabel,
    MaskToLabeld,
    ResizeAspect,
    ResizeAspectd,
    ScaleIntensity2D,
    ScaleIntensity2Dd,
    ToChannels,
    aspect_size,
    image_array,
    model_geometry,
    preprocessing,
)


def _raw(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --------------------------------------------------------------------------------------------- channels
def test_grey_file_loaded_with_3_channels_repeats_it(openist_pair):
    t = LoadImage2D("image", channels=3)(openist_pair[0])
    grey = _raw(openist_pair[0]).astype(np.float32)
    assert tuple(t.shape) == (3, *grey.shape)
    for c in range(3):
        np.testing.assert_array_equal(t[c].numpy(), grey)
    np.testing.assert_array_equal(t.meta["value_range"], [0.0, 255.0])


def test_rgb_file_loaded_with_1_channel_is_luma(ph2_pair):
    t = LoadImage2D("image", channels=1)(ph2_pair[0])
    rgb = _raw(ph2_pair[0]).astype(np.float64)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert tuple(t.shape) == (1, 287, 384)
    np.testing.assert_allclose(t[0].numpy(), luma, atol=1e-3)
    # within rounding of Pillow's own L conversion (same ITU-R 601 weights, integer result)
    pil_l = np.asarray(Image.open(ph2_pair[0]).convert("L")).astype(np.float32)
    assert np.abs(t[0].numpy() - pil_l).max() <= 1.0
    np.testing.assert_array_equal(t.meta["value_range"], [0.0, 255.0])  # kept for fixed normalisation


def test_channels_none_keeps_file_channels(ph2_pair, openist_pair):
    assert LoadImage2D()(ph2_pair[0]).shape[0] == 3
    assert LoadImage2D()(openist_pair[0]).shape[0] == 1
    assert LoadImage2D(channels=3)(ph2_pair[0]).shape[0] == 3


def test_to_channels_array_form():
    rgba = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3)
    torch.testing.assert_close(ToChannels(3)(rgba), rgba[:3])  # alpha dropped
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ToChannels(2)
    with pytest.raises(DataError, match="image has 2 channels; cannot convert to 1"):
        ToChannels(1)(torch.zeros(2, 4, 4))


def test_load_image_dict_form(ph2_pair):
    d = LoadImage2Dd(["image", "label"], label_keys="label", channels=1)({"image": ph2_pair[0], "label": ph2_pair[1], "id": "x"})
    assert tuple(d["image"].shape) == (1, 287, 384) and tuple(d["label"].shape) == (1, 287, 384)
    np.testing.assert_array_equal(d["label"][0].numpy(), _raw(ph2_pair[1]).astype(np.float32))  # raw mask values
    assert d["id"] == "x"


# --------------------------------------------------------------------------------------------- masks
def test_binary_0_255_mask_to_0_1(ph2_pair):
    raw = _raw(ph2_pair[1])
    assert set(np.unique(raw).tolist()) == {0, 255}
    lab = MaskToLabel({0: 0, 255: 1})(LoadImage2D("mask")(ph2_pair[1]))
    assert isinstance(lab, MetaTensor) and lab.meta["filename_or_obj"] == str(ph2_pair[1])
    assert lab.dtype == torch.float32 and tuple(lab.shape) == (1, *raw.shape)
    np.testing.assert_array_equal(lab[0].numpy(), (raw == 255).astype(np.float32))


def test_openist_antialiased_mask_thresholded_at_128(openist_pair):
    raw = _raw(openist_pair[1])
    assert ((raw > 0) & (raw < 255)).any()
    lab = MaskToLabel(threshold=128)(LoadImage2D("mask")(openist_pair[1]))
    np.testing.assert_array_equal(lab[0].numpy(), (raw >= 128).astype(np.float32))
    # the boundary itself
    edge = MaskToLabel(threshold=128)(torch.tensor([[[0.0, 1, 127, 128, 200, 255]]]))
    assert edge.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    # a 0/1 label map (as annotation tools save labels) is taken as class indices, not thresholded away
    assert MaskToLabel(threshold=128)(torch.tensor([[[0.0, 1, 1, 0]]])).flatten().tolist() == [0, 1, 1, 0]
    assert MaskToLabel(threshold=128, ignore=[127])(torch.tensor([[[0.0, 1, 127]]])).flatten().tolist() == [0, 1, IGNORE_INDEX]


def test_v7_ignore_value_preserved_at_native_resolution(v7_ignore_pair):
    raw = _raw(v7_ignore_pair[1])
    n_ignore = int((raw == 127).sum())
    assert n_ignore > 0
    spec = load_dataset_spec("v7_covid").mask
    d = LoadImage2Dd(["image", "label"], label_keys="label")({"image": v7_ignore_pair[0], "label": v7_ignore_pair[1]})
    d = MaskToLabeld("label", spec.values, spec.ignore, spec.threshold)(d)
    lab = d["label"][0].numpy()
    assert lab.shape == raw.shape
    assert int((lab == IGNORE_INDEX).sum()) == n_ignore
    np.testing.assert_array_equal(lab == IGNORE_INDEX, raw == 127)
    np.testing.assert_array_equal(lab == 1, raw == 255)
    np.testing.assert_array_equal(lab == 0, raw == 0)


def test_ignore_with_threshold_is_not_foreground():
    lab = MaskToLabel(threshold=100, ignore=[127])(torch.tensor([[[0.0, 99, 100, 127, 255]]]))
    assert lab.flatten().tolist() == [0, 0, 1, IGNORE_INDEX, 1]


def test_multiclass_label_map(tmp_path, write_png):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 3, (20, 30), dtype=np.uint8)
    f = write_png(tmp_path / "multi_mask.png", raw)
    spec = MaskSpec(values={0: 0, 1: 1, 2: 2})
    assert spec.num_classes == 3
    lab = MaskToLabel(spec.values)(LoadImage2D("mask")(f))
    np.testing.assert_array_equal(lab[0].numpy(), raw.astype(np.float32))
    # raw values remapped to other indices
    lab = MaskToLabel({0: 0, 1: 2, 2: 1})(LoadImage2D("mask")(f))
    np.testing.assert_array_equal(lab[0].numpy(), np.choose(raw, [0, 2, 1]).astype(np.float32))


def test_unexpected_mask_values_name_file_and_values(tmp_path, write_png):
    raw = np.zeros((10, 12), np.uint8)
    raw[2:4, 2:4] = 255
    raw[5, 5] = 3
    raw[6, 6] = 128
    f = write_png(tmp_path / "bad_mask.png", raw)
    with pytest.raises(DataError) as info:
        MaskToLabel({0: 0, 255: 1}, ignore=[127])(LoadImage2D("mask")(f))
    msg = str(info.value)
    assert info.value.path == str(f)
    assert "unexpected values 3, 128" in msg and "allowed: [0, 127, 255]" in msg and "mask.threshold" in msg


def test_multichannel_mask(tmp_path, write_png):
    grey = np.zeros((8, 9), np.uint8)
    grey[3:, 4:] = 255
    f = write_png(tmp_path / "rgb_mask.png", np.dstack([grey] * 3))
    lab = MaskToLabel({0: 0, 255: 1})(LoadImage2D("mask")(f))
    assert tuple(lab.shape) == (1, 8, 9)
    np.testing.assert_array_equal(lab[0].numpy(), (grey == 255).astype(np.float32))

    colours = np.dstack([grey, np.zeros_like(grey), grey])
    g = write_png(tmp_path / "colour_mask.png", colours)
    with pytest.raises(DataError, match="mask has 3 differing channels") as info:
        MaskToLabel({0: 0, 255: 1})(LoadImage2D("mask")(g))
    assert info.value.path == str(g)


def test_mask_to_label_needs_values_or_threshold():
    with pytest.raises(ValueError, match="needs `values` or `threshold`"):
        MaskToLabel()


def test_mask_size_mismatch_names_both_files(ph2_pair, tmp_path):
    small = tmp_path / "small_lesion.png"
    Image.open(ph2_pair[1]).resize((100, 80), Image.NEAREST).save(small)
    d = LoadImage2Dd(["image", "label"], label_keys="label")({"image": ph2_pair[0], "label": small})
    with pytest.raises(DataError) as info:
        MaskToLabeld("label", {0: 0, 255: 1})(d)
    msg = str(info.value)
    assert info.value.path == str(small)
    assert "mask size (80, 100) (HxW) differs from image size (287, 384)" in msg and str(ph2_pair[0]) in msg


# --------------------------------------------------------------------------------------------- intensity
def test_fixed_normalisation_uses_value_range(ph2_pair, data):
    img = LoadImage2D()(ph2_pair[0])
    out = ScaleIntensity2D("fixed")(img)
    np.testing.assert_allclose(out.numpy(), img.numpy() / 255.0 * 2 - 1, atol=1e-6)
    # 15-bit MONOCHROME1 DICOM: scaled by 0..32767, not by its own min/max
    dcm = LoadImage2D()(data / "dicom" / "RG1_UNCI.dcm")
    out = ScaleIntensity2D("fixed")(dcm)
    lo, hi = float(dcm.min()), float(dcm.max())
    assert out.min().item() == pytest.approx(lo / 32767 * 2 - 1, abs=1e-5)
    assert out.max().item() == pytest.approx(hi / 32767 * 2 - 1, abs=1e-5)


def test_minmax_and_percentile_normalisation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 32, 32, generator=g) * 50 + 100
    x[0, 0, 0] = 10_000.0  # a hot pixel
    mm = ScaleIntensity2D("minmax")(x)
    assert mm.min().item() == -1.0 and mm.max().item() == 1.0
    pc = ScaleIntensity2D("percentile", 1, 99)(x)
    assert pc.min().item() == -1.0 and pc.max().item() == 1.0
    assert (pc > -1).float().mean() > 0.9 and (pc < 1).float().mean() > 0.9  # the hot pixel does not squash the rest
    assert (mm < -0.9).float().mean() > 0.9
    # fixed without a value_range falls back to min/max; a constant image does not divide by zero
    torch.testing.assert_close(ScaleIntensity2D("fixed")(x), mm)
    assert ScaleIntensity2D("minmax")(torch.full((1, 4, 4), 7.0)).eq(-1).all()
    d = ScaleIntensity2Dd("image", "minmax")({"image": x, "label": x})
    torch.testing.assert_close(d["image"], mm)
    assert d["label"] is x


# --------------------------------------------------------------------------------------------- geometry
def test_aspect_size():
    assert aspect_size((288, 384), 64, "stretch") == (64, 64)
    assert aspect_size((288, 384), 64, "pad") == (48, 64)
    assert aspect_size((288, 384), 64, "crop") == (64, 85)
    assert aspect_size((384, 288), 64, "pad") == (64, 48)
    assert aspect_size((1000, 2), 8, "pad") == (8, 1)


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
def test_resize_aspect_sizes(aspect):
    img = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = ResizeAspect(16, aspect)(img)
    assert tuple(out.shape) == (3, 16, 16)
    lab = torch.zeros(1, 30, 50)
    lab[0, :, 25:] = 1
    out = ResizeAspect(16, aspect, label=True)(lab)
    assert tuple(out.shape) == (1, 16, 16)
    values = set(torch.unique(out).tolist())
    assert values <= {IGNORE_INDEX, 0.0, 1.0} and {0.0, 1.0} <= values  # nearest: no blended labels
    assert (IGNORE_INDEX in values) == (aspect == "pad")


def test_resize_aspect_dict_form_pads_label_with_ignore():
    resize = ResizeAspectd(["image", "label"], 16, "pad", label_keys="label")
    d = resize({"image": torch.zeros(1, 8, 16), "label": torch.ones(1, 8, 16)})
    assert d["label"][0, :4].eq(IGNORE_INDEX).all() and d["label"][0, 12:].eq(IGNORE_INDEX).all()
    assert d["label"][0, 4:12].eq(1).all()
    assert d["image"][0, :4].eq(-1).all() and d["image"][0, 4:12].eq(0).all()


# --------------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("name", ["isic2018", "ph2", "v7_covid", "openist"])
def test_preprocessing_shipped_specs(name, data, ph2_pair, openist_pair, v7_ignore_pair):
    spec = load_dataset_spec(name)
    if name == "isic2018":
        root = data / "dermoscopy" / "isic2018"
        pair = root / "images" / "ISIC_0000000.jpg", root / "masks" / "ISIC_0000000_segmentation.png"
    else:
        pair = {"ph2": ph2_pair, "v7_covid": v7_ignore_pair, "openist": openist_pair}[name]
    d = preprocessing(spec, Preprocess(resolution=32, aspect="stretch"))({"image": str(pair[0]), "label": str(pair[1])})
    img, lab = d["image"], d["label"]
    assert tuple(img.shape) == (spec.channels, 32, 32) and img.dtype == torch.float32
    assert tuple(lab.shape) == (1, 32, 32) and lab.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1 and img.max() > img.min()
    values = set(torch.unique(lab).tolist())
    assert {0.0, 1.0} <= values <= {IGNORE_INDEX, 0.0, 1.0}
    only_image = preprocessing(spec, Preprocess(resolution=32), with_label=False)({"image": str(pair[0])})
    assert tuple(only_image["image"].shape) == (spec.channels, 32, 32) and "label" not in only_image


def test_preprocessing_pad_marks_padding(ph2_pair):
    spec = load_dataset_spec("ph2")
    d = preprocessing(spec, Preprocess(resolution=64, aspect="pad"))({"image": ph2_pair[0], "label": ph2_pair[1]})
    img, lab = d["image"], d["label"]
    assert tuple(img.shape) == (3, 64, 64) and tuple(lab.shape) == (1, 64, 64)
    # 287x384 -> 48x64, padded by 8 rows above and below
    pad_rows = list(range(8)) + list(range(56, 64))
    inner = slice(8, 56)
    assert lab[0, pad_rows].eq(IGNORE_INDEX).all() and img[:, pad_rows].eq(-1).all()
    assert set(torch.unique(lab[0, inner]).tolist()) == {0.0, 1.0}
    assert img[:, inner].ne(-1).any(0).float().mean() > 0.99
    assert int(lab.eq(IGNORE_INDEX).sum()) == 16 * 64
    assert img.min() >= -1 and img.max() <= 1


@pytest.mark.parametrize("aspect", ["crop", "stretch"])
def test_preprocessing_crop_and_stretch(ph2_pair, aspect):
    spec = load_dataset_spec("ph2")
    d = preprocessing(spec, Preprocess(resolution=48, aspect=aspect))({"image": ph2_pair[0], "label": ph2_pair[1]})
    assert tuple(d["image"].shape) == (3, 48, 48) and tuple(d["label"].shape) == (1, 48, 48)
    assert set(torch.unique(d["label"]).tolist()) == {0.0, 1.0}
    assert d["image"].min() >= -1 and d["image"].max() <= 1


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
def test_preprocessing_keeps_image_and_label_aligned(ph2_pair, tmp_path, aspect):
    """The mask written as the image: after preprocessing, bright image pixels are the label's foreground."""
    mask = _raw(ph2_pair[1])
    img_file = tmp_path / "as_image.png"
    Image.fromarray(mask).save(img_file)
    spec = load_dataset_spec("ph2", ["channels=1"])
    d = preprocessing(spec, Preprocess(resolution=64, aspect=aspect))({"image": img_file, "label": ph2_pair[1]})
    valid = d["label"][0] != IGNORE_INDEX
    agree = ((d["image"][0] > 0) == (d["label"][0] == 1))[valid].float().mean()
    assert agree > 0.97


def test_preprocessing_rejects_bad_mask_before_resizing(ph2_pair, tmp_path):
    spec = load_dataset_spec("ph2")
    small = tmp_path / "small_lesion.png"
    Image.open(ph2_pair[1]).resize((192, 144), Image.NEAREST).save(small)
    with pytest.raises(Exception) as info:  # noqa: B017  (MONAI's Compose wraps it in a RuntimeError)
        preprocessing(spec, Preprocess(resolution=32))({"image": ph2_pair[0], "label": small})
    err = info.value
    while err is not None and not isinstance(err, DataError):
        err = err.__cause__
    assert isinstance(err, DataError), f"no DataError in the chain of {info.value!r}"
    assert err.path == str(small) and "differs from image size" in str(err)


def test_image_array():
    assert image_array(torch.zeros(1, 4, 5)).shape == (4, 5)
    rgb = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5)
    a = image_array(rgb)
    assert a.shape == (4, 5, 3) and a[1, 2, 0] == rgb[0, 1, 2] and a[1, 2, 2] == rgb[2, 1, 2]


def test_dict_forms_follow_monai_conventions(ph2_pair):
    """Every dictionary transform takes ``allow_missing_keys`` (an image-only dict passes a label transform untouched,
    a missing key is an error otherwise) and has MONAI's ``D``/``Dict`` aliases."""
    img, _ = ph2_pair
    d = LoadImage2Dd(["image", "label"], label_keys=["label"], channels=3, allow_missing_keys=True)({"image": img})
    assert set(d) == {"image"} and d["image"].shape[0] == 3
    with pytest.raises(KeyError):
        LoadImage2Dd(["image", "label"], label_keys=["label"], channels=3)({"image": img})
    for t in (MaskToLabeld(["label"], threshold=0.5, allow_missing_keys=True), ScaleIntensity2Dd(["label"], allow_missing_keys=True),
              ResizeAspectd(["label"], 16, allow_missing_keys=True)):
        assert t({"image": d["image"]})["image"] is d["image"]
    assert ts.LoadImage2DD is ts.LoadImage2DDict is LoadImage2Dd and ts.SaveMask2DD is ts.SaveMask2Dd
    assert ts.ScaleIntensity2DD is ScaleIntensity2Dd and ts.ResizeAspectDict is ResizeAspectd and ts.MaskToLabelD is MaskToLabeld


def test_loading_is_quiet_about_gpu_dicom_decoders_without_changing_global_state():
    """Building a LoadImage2D does not warn that nvImageCodec is missing (medhybrid decodes DICOM with pydicom), and
    leaves warning filters and the probe's logger level as they were."""
    import logging
    import warnings

    probe = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level, filters = probe.level, list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        LoadImage2D("image", 3)
        assert list(warnings.filters) == filters
    assert not [w for w in caught if "nvImageCodec" in str(w.message)] and probe.level == level

# --------------------------------------------------------------------------------------------- inference geometry
def restore_logits(logits: torch.Tensor, hw: tuple[int, int], size: int, aspect: str) -> torch.Tensor:
    """Logits (B, K, size, size) mapped back to (B, K, H, W) by MONAI's Invertd through :func:`model_geometry`, as the
    inference pipeline does."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd

    geometry = Compose(model_geometry("image", size, aspect))
    image = geometry({"image": MetaTensor(torch.zeros(1, *hw))})["image"]
    inv = Invertd("pred", transform=geometry, orig_keys="image", nearest_interp=False)
    return torch.stack([torch.as_tensor(inv({"pred": MetaTensor(lg), "image": image})["pred"]) for lg in logits])


def _rect_logits(size: int, rows: tuple[int, int], cols: tuple[int, int], outside: float = -10.0) -> torch.Tensor:
    lg = torch.full((1, 1, size, size), outside)
    lg[..., rows[0] : rows[1], cols[0] : cols[1]] = 10.0
    return lg


def _assert_rect(logits: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """The positive logits form exactly the rectangle ``rows x cols`` (half-open), but for its four corner
    pixels, which bilinear interpolation rounds off."""
    pos = logits > 0
    want = torch.zeros_like(pos)
    want[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert not (pos & ~want).any(), "positive pixels outside the rectangle"
    missing = (want & ~pos).nonzero().tolist()
    corners = [[r, c] for r in (rows[0], rows[1] - 1) for c in (cols[0], cols[1] - 1)]
    assert all(m in corners for m in missing), missing
    assert pos[rows[0]].any() and pos[rows[1] - 1].any() and pos[:, cols[0]].any() and pos[:, cols[1] - 1].any()


def test_restore_logits_pad():
    """64x128 (HxW) at 32 px, pad: resized to 16x32, 8 rows of padding above and below. A rectangle at rows 4..8,
    cols 8..16 of the content (rows 12..16 of the padded map) is rows 16..32, cols 32..64 at native size (x4)."""
    lg = _rect_logits(32, (12, 16), (8, 16))
    lg[..., :8, :] = 10.0  # the padding is cut off whatever it holds
    lg[..., 24:, :] = 10.0
    out = restore_logits(lg, (64, 128), 32, "pad")
    assert out.shape == (1, 1, 64, 128)
    _assert_rect(out[0, 0], (16, 32), (32, 64))


def test_restore_logits_pad_portrait():
    """128x64 (portrait): the padding is left and right."""
    lg = _rect_logits(32, (8, 16), (12, 16))
    lg[..., :, :8] = 10.0
    out = restore_logits(lg, (128, 64), 32, "pad")
    _assert_rect(out[0, 0], (32, 64), (16, 32))


def test_restore_logits_crop():
    """64x128 at 32 px, crop: resized to 32x64, cols 16..48 kept. Rows 8..16, cols 4..12 of the crop are rows
    16..32, cols (16+4)*2..(16+12)*2 = 40..56 at native size; the cropped-away sides replicate the edge logits."""
    out = restore_logits(_rect_logits(32, (8, 16), (4, 12)), (64, 128), 32, "crop")
    assert out.shape == (1, 1, 64, 128)
    _assert_rect(out[0, 0], (16, 32), (40, 56))
    # a rectangle touching the crop's left edge extends over the unseen border
    out = restore_logits(_rect_logits(32, (8, 16), (0, 4)), (64, 128), 32, "crop")
    _assert_rect(out[0, 0], (16, 32), (0, 40))


def test_restore_logits_stretch():
    """48x96 stretched to 32x32: rows x1.5, cols x3."""
    out = restore_logits(_rect_logits(32, (4, 8), (8, 16)), (48, 96), 32, "stretch")
    assert out.shape == (1, 1, 48, 96)
    _assert_rect(out[0, 0], (6, 12), (24, 48))


def test_restore_logits_keeps_channels():
    lg = torch.randn(2, 3, 32, 32)
    assert restore_logits(lg, (40, 20), 32, "pad").shape == (2, 3, 40, 20)
