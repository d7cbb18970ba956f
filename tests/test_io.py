"""medhybrid.data.io: every reader path, display orientation, DICOM semantics and errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhybrid.core.files import atomic_write, write_json
from medhybrid.data.io import DataError, Image2DReader, file_suffix, read_image, reduction_factor
from medhybrid.data.transforms import LoadImage2D


def _loaded(path, channels=None) -> np.ndarray:
    """LoadImage2D's output as an HxW(xC) numpy array."""
    t = LoadImage2D("image", channels)(path)
    a = t.numpy()
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)


# --------------------------------------------------------------------------------------------- PIL formats
def test_png_rgb(ph2_pair):
    arr, meta = read_image(ph2_pair[0])
    assert arr.shape == (287, 384, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, np.asarray(Image.open(ph2_pair[0])))
    assert meta["value_range"] == (0.0, 255.0)
    assert meta["format"] == "pil" and meta["mode"] == "RGB"
    assert tuple(meta["spatial_shape"]) == (287, 384)


def test_png_grey(data):
    f = data / "chest_xray" / "v7_covid" / "images" / "01E392EE-69F9-4E33-BFCE-E5C968654078.png"
    arr, meta = read_image(f)
    assert arr.shape == (381, 512) and arr.dtype == np.uint8
    assert meta["mode"] == "L" and meta["value_range"] == (0.0, 255.0)


def test_jpeg_grey_and_rgb(openist_pair, data):
    grey, meta = read_image(openist_pair[0])
    assert grey.ndim == 2 and grey.dtype == np.uint8 and meta["mode"] == "L"
    assert grey.shape == np.asarray(Image.open(openist_pair[1])).shape  # same size as its mask
    rgb, meta = read_image(data / "dermoscopy" / "isic2018" / "images" / "ISIC_0000000.jpg")
    assert rgb.shape == (256, 256, 3) and meta["value_range"] == (0.0, 255.0)


def test_bmp_written_from_real_png(ph2_pair, tmp_path):
    ref = np.asarray(Image.open(ph2_pair[0]))
    f = tmp_path / "IMD002.bmp"
    Image.fromarray(ref).save(f)
    arr, meta = read_image(f)
    np.testing.assert_array_equal(arr, ref)
    assert meta["mode"] == "RGB"


def test_tiff_8_and_16_bit(grey_pixels, tmp_path):
    f8 = tmp_path / "grey8.tif"
    Image.fromarray(grey_pixels).save(f8)
    arr, meta = read_image(f8)
    np.testing.assert_array_equal(arr, grey_pixels)
    assert meta["value_range"] == (0.0, 255.0)

    wide = grey_pixels.astype(np.uint16) * 257
    f16 = tmp_path / "grey16.tiff"
    Image.fromarray(wide).save(f16)
    arr, meta = read_image(f16)
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, wide)
    assert meta["value_range"] == (0.0, 65535.0)


def test_png_16_bit(grey_pixels, tmp_path):
    wide = grey_pixels.astype(np.uint16) * 100
    f = tmp_path / "grey16.png"
    Image.fromarray(wide).save(f)
    arr, meta = read_image(f)
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, wide)
    assert meta["value_range"] == (0.0, 65535.0)


def test_palette_png_image_becomes_rgb_mask_keeps_indices(rgb_pixels, tmp_path):
    f = tmp_path / "palette.png"
    pal = Image.fromarray(rgb_pixels).quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    pal.save(f)
    img, _ = read_image(f, "image")
    assert img.shape == (36, 60, 3)
    np.testing.assert_array_equal(img, np.asarray(pal.convert("RGB")))
    idx, meta = read_image(f, "mask")
    assert idx.shape == (36, 60) and meta["mode"] == "P"
    np.testing.assert_array_equal(idx, np.asarray(pal))


def test_rgba_png_drops_alpha(rgb_pixels, tmp_path):
    rgba = np.dstack([rgb_pixels, np.full(rgb_pixels.shape[:2], 200, np.uint8)])
    f = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(f)
    arr, _ = read_image(f)
    np.testing.assert_array_equal(arr, rgb_pixels)


# --------------------------------------------------------------------------------------------- NIfTI, ITK
def test_nifti_grey_and_rgb(grey_pixels, rgb_pixels, tmp_path):
    import nibabel as nib

    # NIfTI's first axis is i (columns): the display-order HxW array is stored transposed
    nib.save(nib.Nifti1Image(grey_pixels.T.copy(), np.eye(4)), tmp_path / "grey.nii.gz")
    arr, meta = read_image(tmp_path / "grey.nii.gz")
    np.testing.assert_array_equal(arr, grey_pixels)
    assert meta["format"] == "nifti" and meta["value_range"] == (0.0, 255.0)

    nib.save(nib.Nifti1Image(np.transpose(rgb_pixels, (1, 0, 2))[:, :, None, :].copy(), np.eye(4)), tmp_path / "rgb.nii")
    arr, _ = read_image(tmp_path / "rgb.nii")
    np.testing.assert_array_equal(arr, rgb_pixels)


def test_nifti_written_by_simpleitk_matches(grey_pixels, tmp_path):
    """read_nifti's transpose follows ITK's convention: a NIfTI written by SimpleITK reads back unchanged."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(grey_pixels), str(tmp_path / "itk.nii.gz"))
    arr, _ = read_image(tmp_path / "itk.nii.gz")
    np.testing.assert_array_equal(arr, grey_pixels)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_simpleitk_formats(grey_pixels, rgb_pixels, tmp_path, suffix):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(grey_pixels), str(tmp_path / f"grey{suffix}"))
    arr, meta = read_image(tmp_path / f"grey{suffix}")
    np.testing.assert_array_equal(arr, grey_pixels)
    assert meta["format"] == "sitk" and meta["value_range"] == (0.0, 255.0)

    sitk.WriteImage(sitk.GetImageFromArray(rgb_pixels, isVector=True), str(tmp_path / f"rgb{suffix}"))
    arr, _ = read_image(tmp_path / f"rgb{suffix}")
    np.testing.assert_array_equal(arr, rgb_pixels)


def test_simpleitk_single_slice_volume_is_2d(grey_pixels, tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(grey_pixels[None]), str(tmp_path / "slice.mha"))
    arr, _ = read_image(tmp_path / "slice.mha")
    np.testing.assert_array_equal(arr, grey_pixels)


# --------------------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".dcm", ".nii", ".nii.gz", ".mha", ".nrrd"])
def test_same_pixels_load_identically_in_every_format(grey_pixels, tmp_path, suffix, write_dicom):
    """The same non-square pixels as PNG, DICOM, NIfTI and ITK files: the same array, no transpose or flip."""
    import nibabel as nib
    import SimpleITK as sitk

    png = tmp_path / "ref.png"
    Image.fromarray(grey_pixels).save(png)
    src = np.asarray(Image.open(png))  # the pixels as a PNG viewer shows them
    f = tmp_path / f"same{suffix}"
    if suffix in (".png", ".bmp", ".tif"):
        Image.fromarray(src).save(f)
    elif suffix == ".dcm":
        write_dicom(f, src)
    elif suffix in (".nii", ".nii.gz"):
        nib.save(nib.Nifti1Image(src.T.copy(), np.eye(4)), f)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(src), str(f))

    arr, meta = read_image(f)
    assert arr.shape == (40, 72)
    np.testing.assert_array_equal(arr, src)
    assert meta["value_range"] == (0.0, 255.0)
    t = LoadImage2D()(f)
    assert tuple(t.shape) == (1, 40, 72) and t.dtype.is_floating_point
    np.testing.assert_array_equal(t[0].numpy(), src.astype(np.float32))


def test_dicom_from_png_pixels_equals_png(openist_pair, tmp_path, write_dicom):
    """A whole real (non-square) X-ray wrapped as MONOCHROME2 8-bit DICOM loads exactly like the JPEG."""
    ref, _ = read_image(openist_pair[0])
    write_dicom(tmp_path / "x.dcm", ref)
    arr, meta = read_image(tmp_path / "x.dcm")
    np.testing.assert_array_equal(arr, ref)
    assert meta["photometric"] == "MONOCHROME2" and meta["value_range"] == (0.0, 255.0)
    np.testing.assert_array_equal(_loaded(tmp_path / "x.dcm"), _loaded(openist_pair[0]))


# --------------------------------------------------------------------------------------------- DICOM
def test_dicom_jpeg2000_decodes_like_uncompressed(data):
    unc, meta_u = read_image(data / "dicom" / "RG1_UNCI.dcm")
    j2k, meta_j = read_image(data / "dicom" / "RG1_J2KI.dcm")
    assert unc.shape == j2k.shape == (1955, 1841)
    np.testing.assert_array_equal(j2k, unc)
    assert meta_u["value_range"] == meta_j["value_range"] == (0.0, 32767.0)  # 15 bits stored


def test_real_monochrome1_is_inverted(data):
    import pydicom

    ds = pydicom.dcmread(data / "dicom" / "RG1_UNCI.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    arr, meta = read_image(data / "dicom" / "RG1_UNCI.dcm")
    assert meta["photometric"] == "MONOCHROME1" and meta["bits_stored"] == 15
    np.testing.assert_array_equal(arr.astype(np.int64), 32767 - ds.pixel_array.astype(np.int64))


def test_nih_dx_dicom_loads_1024(data):
    arr, meta = read_image(data / "dicom" / "nih_cxr14_dx_1024.dcm")
    assert arr.shape == (1024, 1024) and arr.dtype == np.uint8
    assert meta["photometric"] == "MONOCHROME2" and meta["value_range"] == (0.0, 255.0)
    t = LoadImage2D(channels=1)(data / "dicom" / "nih_cxr14_dx_1024.dcm")
    assert tuple(t.shape) == (1, 1024, 1024)


def test_synthetic_monochrome1_inverted_monochrome2_not(grey_pixels, tmp_path, write_dicom):
    lo, hi = 0, 255
    m1, meta1 = read_image(write_dicom(tmp_path / "m1.dcm", grey_pixels, photometric="MONOCHROME1"))
    m2, meta2 = read_image(write_dicom(tmp_path / "m2.dcm", grey_pixels, photometric="MONOCHROME2"))
    np.testing.assert_array_equal(m1.astype(np.int64), lo + hi - grey_pixels.astype(np.int64))
    np.testing.assert_array_equal(m2, grey_pixels)
    assert meta1["value_range"] == meta2["value_range"] == (0.0, 255.0)

    # 12 bits stored in 16: inverted within 0..4095, not 0..65535
    raw12 = grey_pixels.astype(np.uint16) * 16
    m1_12, meta = read_image(write_dicom(tmp_path / "m1_12.dcm", raw12, photometric="MONOCHROME1", bits_stored=12))
    np.testing.assert_array_equal(m1_12.astype(np.int64), 4095 - raw12.astype(np.int64))
    assert meta["value_range"] == (0.0, 4095.0)


def test_rescale_slope_intercept(grey_pixels, tmp_path, write_dicom):
    arr, meta = read_image(write_dicom(tmp_path / "r.dcm", grey_pixels, slope=2, intercept=-100))
    np.testing.assert_allclose(arr, grey_pixels.astype(np.float64) * 2 - 100)
    assert meta["value_range"] == (-100.0, 410.0)
    assert meta["rescale_slope"] == 2.0 and meta["rescale_intercept"] == -100.0

    # with MONOCHROME1, the inversion is applied after the rescale, within the rescaled range
    arr, meta = read_image(write_dicom(tmp_path / "r1.dcm", grey_pixels, photometric="MONOCHROME1", slope=2, intercept=-100))
    np.testing.assert_allclose(arr, -100 + 410 - (grey_pixels.astype(np.float64) * 2 - 100))
    assert meta["value_range"] == (-100.0, 410.0)


@pytest.mark.parametrize(("dtype", "bits", "expected"), [
    (np.uint16, 16, (0.0, 65535.0)),
    (np.uint16, 12, (0.0, 4095.0)),
    (np.int16, 12, (-2048.0, 2047.0)),
])
def test_dicom_bits_stored_value_range(grey_pixels, tmp_path, write_dicom, dtype, bits, expected):
    raw = (grey_pixels.astype(np.int32) * 8 - (1024 if dtype == np.int16 else 0)).astype(dtype)
    arr, meta = read_image(write_dicom(tmp_path / "b.dcm", raw, bits_stored=bits))
    np.testing.assert_array_equal(arr, raw)
    assert meta["bits_stored"] == bits and meta["value_range"] == expected


# --------------------------------------------------------------------------------------------- errors
def _raises(path, problem, role="image") -> DataError:
    with pytest.raises(DataError) as info:
        read_image(path, role)
    assert info.value.path == str(path)
    assert str(path) in str(info.value) and problem in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    _raises(tmp_path / "absent.png", "file not found")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").touch()
    _raises(tmp_path / "empty.png", "file is empty")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    _raises(tmp_path / "x.gif", "unsupported file type '.gif'")


def test_corrupt_png(tmp_path):
    f = tmp_path / "noise.png"
    f.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    _raises(f, "cannot decode image")


@pytest.mark.parametrize("source", ["jpeg", "png"])
def test_truncated_image(ph2_pair, openist_pair, tmp_path, source):
    src = openist_pair[0] if source == "jpeg" else ph2_pair[0]
    f = tmp_path / f"half{src.suffix}"
    raw = src.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    _raises(f, "truncated")


def test_dicom_without_pixel_data(data, tmp_path):
    import pydicom

    ds = pydicom.dcmread(data / "dicom" / "nih_cxr14_dx_1024.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    _raises(tmp_path / "nopix.dcm", "no pixel data")


def test_not_a_dicom(tmp_path):
    f = tmp_path / "fake.dcm"
    f.write_bytes(b"this is not DICOM" * 20)
    _raises(f, "not a readable DICOM file")


def test_truncated_dicom_pixel_data(data, tmp_path):
    raw = (data / "dicom" / "nih_cxr14_dx_1024.dcm").read_bytes()
    f = tmp_path / "cut.dcm"
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        read_image(f)
    assert info.value.path == str(f)


def test_3d_inputs_rejected(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    vol = np.zeros((5, 6, 7), np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    _raises(tmp_path / "vol.nii.gz", "NIfTI image has shape (5, 6, 7)")
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "vol.mha"))
    _raises(tmp_path / "vol.mha", "3D image of size (7, 6, 5)")


def test_loadimage2d_raises_the_readers_error(tmp_path):
    """Through MONAI's LoadImage, the DataError of medhybrid's reader reaches the caller unchanged (no silent
    fallback to MONAI's own readers, which would load a 3D NIfTI or hide which file failed)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), np.eye(4)), tmp_path / "vol.nii.gz")
    (tmp_path / "noise.png").write_bytes(b"\x00" * 100)
    for f, problem in [(tmp_path / "vol.nii.gz", "medhybrid reads 2D images"), (tmp_path / "noise.png", "cannot decode"),
                       (tmp_path / "absent.png", "file not found")]:
        with pytest.raises(DataError) as info:
            LoadImage2D()(f)
        assert info.value.path == str(f) and problem in str(info.value)


# --------------------------------------------------------------------------------------------- helpers
def test_file_suffix():
    assert file_suffix("a/b/Case.NII.GZ") == ".nii.gz"
    assert file_suffix("x.PNG") == ".png"
    assert file_suffix("scan.dcm") == ".dcm"
    assert file_suffix("noext") == ""


def test_image2d_reader_suffixes_and_single_file(ph2_pair):
    r = Image2DReader()
    assert r.verify_suffix("a.png") and r.verify_suffix(["a.dcm", "b.nii.gz"]) and r.verify_suffix("c.nrrd")
    assert not r.verify_suffix("a.gif") and not r.verify_suffix(["a.png", "b.txt"])
    with pytest.raises(ValueError, match="one file at a time"):
        r.read([ph2_pair[0], ph2_pair[0]])
    arr, meta = r.get_data(r.read(ph2_pair[0]))
    assert arr.shape == (287, 384, 3)
    assert meta["original_channel_dim"] == -1
    np.testing.assert_array_equal(meta["value_range"], [0.0, 255.0])


def test_data_error_message():
    e = DataError("/x/y.png", "broken")
    assert str(e) == "/x/y.png: broken" and e.path == "/x/y.png" and e.problem == "broken"
    assert str(DataError(None, "no file")) == "no file"
    assert isinstance(e, ValueError)


# ------------------------------------------------------------------- DICOM transfer syntaxes, bare datasets, palettes
# Real DICOM files of many kinds, shipped inside pydicom's wheel (read in place; nothing is downloaded).
def _pydicom_file(name: str) -> Path:
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


@pytest.mark.parametrize("compressed,reference,syntax", [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG Lossless, first-order prediction
])
def test_lossless_jpeg_family_decodes_like_the_uncompressed_image(compressed, reference, syntax):
    import pydicom

    assert pydicom.dcmread(_pydicom_file(compressed), stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    arr, meta = read_image(_pydicom_file(compressed))
    np.testing.assert_array_equal(arr, read_image(_pydicom_file(reference))[0])
    assert meta["format"] == "dicom"


@pytest.mark.parametrize("name,syntax,shape", [
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", (1024, 256)),  # JPEG Extended, 12-bit (Pillow cannot)
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", (50, 10)),  # JPEG-LS near-lossless, 16-bit
    ("SC_rgb_jls_lossy_line.dcm", "1.2.840.10008.1.2.4.81", (100, 100, 3)),
])
def test_lossy_jpeg_family_decodes(name, syntax, shape):
    import pydicom

    assert pydicom.dcmread(_pydicom_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    arr, meta = read_image(_pydicom_file(name))
    assert arr.shape == shape and np.ptp(arr) > 0
    lo, hi = meta["value_range"]
    assert lo <= arr.min() and arr.max() <= hi


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPGExtended.dcm", "MR_small.dcm"])
def test_dicom_without_preamble_or_file_meta_reads_like_the_file(name, tmp_path):
    """A bare dataset (no preamble, no file meta, so no transfer syntax): the syntax is read from the element encoding
    or the compressed codestream, the pixels are those of the Part 10 file, and the file is found without a suffix."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.io import file_channels, is_dicom_file
    from medhybrid.data.specs import load_dataset_spec

    ds = pydicom.dcmread(_pydicom_file(name))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    bare = tmp_path / "export" / "IM0001"
    bare.parent.mkdir()
    pydicom.dcmwrite(bare, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00"  # starts with the dataset itself
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(bare)
    np.testing.assert_array_equal(read_image(bare)[0], read_image(_pydicom_file(name))[0])
    assert is_dicom_file(bare) and file_channels(bare) == read_image(bare)[0].ndim * 2 - 3
    assert [p["id"] for p in load_pairs(load_dataset_spec(str(bare.parent)))] == ["IM0001"]


def test_encapsulated_syntax_from_the_codestream():
    from pydicom.encaps import encapsulate

    from medhybrid.data.io import encapsulated_syntax

    def stream(sof: int, near: int = 0) -> bytes:
        sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0, near, 0, 0])
        return bytes([0xFF, 0xD8, 0xFF, sof, 0, 2]) + sos + b"\x00" * 10 + bytes([0xFF, 0xD9])

    assert encapsulated_syntax(encapsulate([stream(0xC3)])) == "1.2.840.10008.1.2.4.70"
    assert encapsulated_syntax(encapsulate([stream(0xC1)])) == "1.2.840.10008.1.2.4.51"
    assert encapsulated_syntax(encapsulate([stream(0xF7)])) == "1.2.840.10008.1.2.4.80"
    assert encapsulated_syntax(encapsulate([stream(0xF7, near=2)])) == "1.2.840.10008.1.2.4.81"
    assert encapsulated_syntax(encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 8])) == "1.2.840.10008.1.2.4.90"
    assert encapsulated_syntax(b"\x00" * 64) is None  # native pixel data


def test_palette_color_dicom_becomes_rgb():
    import pydicom
    from pydicom.pixels import apply_color_lut

    from medhybrid.data.io import file_channels

    path = _pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    arr, meta = read_image(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and file_channels(path) == 3
    assert arr.shape == (*ds.pixel_array.shape, 3)
    np.testing.assert_array_equal(arr, apply_color_lut(ds.pixel_array, ds))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > len(np.unique(ds.pixel_array)) / 2  # colours, not indices


@pytest.mark.parametrize("name,problem", [
    ("no_meta.dcm", "not a readable DICOM file"),  # no preamble, no meta, and no image dataset either
    ("rtstruct.dcm", "no pixel data"),
    ("MR_truncated.dcm", "cannot decode DICOM pixel data"),
])
def test_broken_real_dicom_files_name_the_file(name, problem):
    with pytest.raises(DataError) as info:
        read_image(_pydicom_file(name))
    assert problem in str(info.value) and name in str(info.value)


def test_write_json_is_atomic(tmp_path):
    """The file is replaced whole, no temporary file stays behind, and a strict write that fails (NaN) leaves
    the previous content in place."""
    path = write_json(tmp_path / "a.json", {"x": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"x": [1, 2]} and path.read_text().startswith("{\n \"x\"")
    with pytest.raises(ValueError):
        write_json(path, {"x": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    """The temporary file ends in the target's name (so suffix-driven writers keep their format), replaces the target
    only when the body succeeds, and never stays behind."""
    path = tmp_path / "sub" / "mask.png"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.endswith("mask.png") and tmp != path
        tmp.write_bytes(b"one")
    assert path.read_bytes() == b"one"
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"one" and [p.name for p in path.parent.iterdir()] == ["mask.png"]


# --------------------------------------------------------------------------------------------- reduced decoding
def test_reduction_factor_keeps_the_short_side():
    assert reduction_factor((3000, 4000), 512) == 4 and reduction_factor((3000, 4000), 256) == 8
    assert reduction_factor((576, 768), 512) == 1 and reduction_factor((1024, 1024), 512) == 2
    assert reduction_factor((3000, 4000), None) == 1


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_camera_size_image_decodes_reduced_and_keeps_its_size(ph2_pair, tmp_path, suffix):
    """A 4000x3000 photograph (a PH2 image upscaled): JPEG by draft decoding, PNG by a box reduction, both to
    1000x750 with the file's size kept as ``original_shape``; close to the full decode shrunk the same way. A mask is
    never reduced."""
    big = tmp_path / f"camera{suffix}"
    Image.open(ph2_pair[0]).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(big)
    arr, meta = read_image(big, reduce_to=512)
    assert arr.shape == (750, 1000, 3) and arr.dtype == np.uint8 and tuple(meta["original_shape"]) == (3000, 4000)
    full, full_meta = read_image(big)
    assert full.shape == (3000, 4000, 3) and "original_shape" not in full_meta
    shrunk = full.reshape(750, 4, 1000, 4, 3).mean(axis=(1, 3))
    assert np.abs(arr - shrunk).mean() < 2.0
    assert read_image(big, role="mask", reduce_to=512)[0].shape[:2] == (3000, 4000)


def test_large_dicom_is_averaged_once_after_decoding(data):
    """The CR image (1955x1841, 15-bit MONOCHROME1): block means of the decoded values, the value range unchanged."""
    arr, meta = read_image(data / "dicom" / "RG1_UNCI.dcm", reduce_to=512)
    full, full_meta = read_image(data / "dicom" / "RG1_UNCI.dcm")
    assert arr.shape == (full.shape[0] // 2, full.shape[1] // 2) and tuple(meta["original_shape"]) == full.shape
    np.testing.assert_allclose(arr[10, 10], full[20:22, 20:22].mean(), rtol=1e-6)
    assert tuple(meta["value_range"]) == tuple(full_meta["value_range"])

