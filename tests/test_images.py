import io
import struct

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from patchcore.errors import ImageLoadError
from patchcore.engine.geometry import InputTransform
from patchcore.engine.images import expand_sources, iterate_batches, list_images, read_image


def test_reads_16_bit_grayscale_rgba_and_palette(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")

    deep = np.asarray(read_image(tmp_path / "deep.png"))
    assert deep.shape == (64, 64, 3) and deep.dtype == np.uint8
    # 16-bit values are scaled to 8 bits, not clipped: the ramp's top stays near white.
    assert deep[-1, -1, 0] == round(int(ramp[-1, -1]) * 255 / 65535)
    assert deep[0, 0, 0] == 0
    assert np.asarray(read_image(tmp_path / "alpha.png"))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(read_image(tmp_path / "gray.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(read_image(tmp_path / "palette.png"))[0, 0].tolist() == [120, 120, 120]


def _png_with_sbit(path, values: np.ndarray, significant: int) -> None:
    """A 16-bit grayscale PNG whose sBIT chunk says ``significant`` bits of each sample are real."""
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([significant]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)


def _tiff_12_bit(values: np.ndarray) -> bytes:
    """An uncompressed grayscale TIFF with BitsPerSample 12 (two samples packed in three bytes)."""
    height, width = values.shape
    pairs = values.astype(np.uint16).reshape(-1, 2)
    packed = np.stack([pairs[:, 0] >> 4, (pairs[:, 0] & 0xF) << 4 | pairs[:, 1] >> 8, pairs[:, 1] & 0xFF], axis=1)
    data = packed.astype(np.uint8).tobytes()
    # width, height, BitsPerSample, no compression, min-is-black, strip offset, 1 sample, rows per strip, strip bytes
    tags = [(256, width), (257, height), (258, 12), (259, 1), (262, 1), (273, None), (277, 1), (278, height), (279, len(data))]
    start = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, start if value is None else value) for tag, value in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + b"\x00" * 4 + data


def test_a_dark_16_bit_photo_stays_dark(tmp_path):
    dark = (np.arange(64 * 64).reshape(64, 64) % 201).astype(np.uint16)  # 0..200 of 65535: nearly black
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(dark).save(tmp_path / "dark.tif")
    for path in (tmp_path / "dark.png", tmp_path / "dark.tif"):
        for source in (path, path.read_bytes(), Image.open(path), Image.open(path).convert("I")):
            assert np.asarray(read_image(source)).max() == 1, (path, type(source))  # 200 * 255 / 65535 = 0.78
    # Arrays: uint16 and int32 (how Pillow hands out 16-bit images) are 16-bit data whatever they hold.
    assert np.asarray(read_image(dark)).max() == 1
    assert np.asarray(read_image(dark.astype(np.int32))).max() == 1


def test_12_bit_data_in_16_bit_files_uses_the_declared_depth(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # 0..4095
    _png_with_sbit(tmp_path / "camera.png", ramp, 12)
    for source in (tmp_path / "camera.png", (tmp_path / "camera.png").read_bytes(), Image.open(tmp_path / "camera.png")):
        pixels = np.asarray(read_image(source))[..., 0]
        assert pixels.max() == 255 and pixels[0, 0] == 0  # 4095 is white, not 4095 / 65535 (16)
        np.testing.assert_array_equal(pixels, np.rint(ramp * (255 / 4095)).astype(np.uint8))
    # The PNG standard's way: 12 significant bits scaled up to 16 (v << 4). Such samples exceed
    # 4095, so the header's 16 bits apply and the photo is not blown out to white.
    _png_with_sbit(tmp_path / "standard.png", ramp << 4, 12)
    pixels = np.asarray(read_image(tmp_path / "standard.png"))[..., 0]
    np.testing.assert_array_equal(pixels, np.rint((ramp << 4) * (255 / 65535)).astype(np.uint8))
    # A TIFF that declares 12 bits per sample.
    pixels = np.asarray(read_image(_tiff_12_bit(ramp)))[..., 0]
    np.testing.assert_array_equal(pixels, np.rint(ramp * (255 / 4095)).astype(np.uint8))
    # Without a declaration the file's 16 bits apply (no guess from the content).
    Image.fromarray(ramp).save(tmp_path / "plain.tif")
    assert np.asarray(read_image(tmp_path / "plain.tif")).max() == 16


def test_arrays_of_no_known_bit_depth_are_refused():
    with pytest.raises(ImageLoadError, match=r"<image 2>: image array of type int64 has no known bit depth: convert it to uint8"):
        read_image(np.zeros((4, 4), np.int64), position=2)


def test_reads_arrays_of_every_layout():
    assert read_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert read_image(np.zeros((5, 6, 1), np.uint16)).mode == "RGB"
    assert np.asarray(read_image(np.full((2, 2, 3), 0.5, np.float32)))[0, 0, 0] == 128
    with pytest.raises(ImageLoadError, match="<image 3>.*shape"):
        read_image(np.zeros((2, 2, 2, 2)), position=3)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "not an image"),
        (b"hello, I am text", "not an image"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=f"bad.png: {problem}"):
        read_image(path)


def test_truncated_png_and_jpeg_are_reported(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for suffix, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        with pytest.raises(ImageLoadError, match=f"cut{suffix}: corrupt or truncated"):
            read_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="big.png: image is too large"):
        read_image(tmp_path / "big.png")


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="holds no images"):
        list_images(tmp_path)


def test_transform_matches_the_paper_geometry():
    transform = InputTransform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    image = Image.fromarray(np.full((400, 800, 3), 255, np.uint8))
    pixels, placement = transform(image)
    assert pixels.shape == (3, 224, 224)
    assert float(pixels.min()) == pytest.approx(1.0)  # white -> +1 after [-1, 1] scaling
    # 400x800 -> 256x512 -> centre 224 crop: the box is 350 px square in the middle.
    left, top, right, bottom = placement.box
    assert right - left == pytest.approx(224 * 400 / 256)
    assert bottom - top == pytest.approx(224 * 400 / 256)
    assert (left + right) / 2 == pytest.approx(400)
    assert (top + bottom) / 2 == pytest.approx(200)
    assert not placement.covers_image


def test_whole_image_transform_keeps_the_aspect_ratio_and_pads_to_the_stride():
    transform = InputTransform(256, None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), stride=16)
    ramp = np.tile(np.linspace(0, 255, 1000).astype(np.uint8)[None, :, None], (700, 1, 3))  # 1000x700, bright right
    pixels, placement = transform(Image.fromarray(ramp))
    # Shorter side 700 -> 256; 1000 -> 366 px, padded to 368 (a multiple of 16) by repeating the last column.
    assert pixels.shape == (3, 256, 368)
    assert placement.content_size == (256, 366) and placement.input_size == (256, 368)
    assert placement.box == (0.0, 0.0, 1000.0, 700.0) and placement.covers_image
    assert np.array_equal(pixels[:, :, 366], pixels[:, :, 365]) and np.array_equal(pixels[:, :, 367], pixels[:, :, 365])
    assert float(pixels[0, 0, 0]) < -0.9 and float(pixels[0, 0, 365]) > 0.9
    exact = InputTransform((384, 256), None, (0.5,) * 3, (0.5,) * 3, stride=16)
    assert exact(Image.fromarray(ramp))[0].shape == (3, 256, 384)
    native = InputTransform(None, None, (0.5,) * 3, (0.5,) * 3, stride=32)
    assert native(Image.fromarray(ramp))[1].input_size == (704, 1024)


def test_batches_split_where_the_input_size_changes(tmp_path):
    transform = InputTransform(64, None, (0.5,) * 3, (0.5,) * 3, stride=16)
    sizes = [(64, 64), (64, 64), (128, 64), (64, 64)]  # width, height
    images = [np.zeros((h, w, 3), np.uint8) for w, h in sizes]
    batches = list(iterate_batches(images, transform, batch_size=4))
    assert [tuple(b.pixels.shape) for b in batches] == [(2, 3, 64, 64), (1, 3, 64, 128), (1, 3, 64, 64)]
    assert [name for b in batches for name in b.names] == [f"<image {i}>" for i in range(4)]


def test_transform_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="crop"):
        InputTransform(100, 200, (0, 0, 0), (1, 1, 1))


def test_batches_keep_order_and_skip_bad_images_on_request(tmp_path, product_images):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    sources = [product_images["train"][0], tmp_path / "broken.png", product_images["train"][1]]
    transform = InputTransform(64, 64, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImageLoadError, match="broken.png"):
        list(iterate_batches(sources, transform, batch_size=2))
    skipped = []
    batches = list(iterate_batches(sources, transform, batch_size=2, on_error=skipped.append))
    assert [name for b in batches for name in b.names] == [str(sources[0]), str(sources[2])]
    assert len(skipped) == 1 and "broken.png" in str(skipped[0])


def test_expand_sources_reads_folders_sorted(product_images):
    folder = product_images["train"][0].parent
    assert expand_sources(folder) == sorted(product_images["train"])
    with pytest.raises(ValueError, match="no images"):
        expand_sources([])


def _rotated_jpeg(path, orientation: int) -> np.ndarray:
    """Save a 40x20 (width x height) JPEG whose EXIF says 'rotate' (6: 90 degrees clockwise); return its pixels."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = [255, 0, 0]  # red band on the left, as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    return pixels


def test_exif_orientation_is_applied_when_reading_photos_and_masks(tmp_path):
    from patchcore.evaluation.datasets import TestSample, check_image_file, load_mask

    _rotated_jpeg(tmp_path / "phone.jpg", 6)
    upright = read_image(tmp_path / "phone.jpg")
    # Stored 40 wide x 20 high; a viewer shows it turned 90 degrees clockwise: 20 wide, 40 high,
    # and the red band that was on the left is now at the top.
    assert upright.size == (20, 40)
    array = np.asarray(upright).astype(int)
    assert array[2, 10, 0] > 200 and array[2, 10, 2] < 60 and array[-2, 10, 0] < 60
    assert read_image((tmp_path / "phone.jpg").read_bytes()).size == (20, 40)  # uploads alike
    assert check_image_file(tmp_path / "phone.jpg") == (40, 20)  # (height, width), upright
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :10] = 255
    mask_image = Image.fromarray(mask)
    exif = mask_image.getexif()
    exif[0x0112] = 6
    mask_image.save(tmp_path / "phone_mask.png", exif=exif)
    loaded = load_mask(TestSample(tmp_path / "phone.jpg", 1, "x", tmp_path / "phone_mask.png"))
    assert loaded.shape == (40, 20) and loaded[:10].all() and not loaded[10:].any()


def test_folder_listing_says_what_it_skipped_and_why(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "notes.txt").write_text("not an image, not counted")
    with pytest.warns(UserWarning, match=r"skipped 2 unusable entries: folder\.jpg \(not a regular file\); "
                                         r"gone\.png \(link to a missing file\)"):
        assert list_images(tmp_path) == [tmp_path / "a.png"]


def test_jpegs_are_decoded_at_the_scale_the_network_needs(tmp_path):
    from patchcore.engine.geometry import InputTransform

    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((1000, 1600, 3)) * 255).astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    transform = InputTransform(256, None, (0.5,) * 3, (0.5,) * 3, stride=16)
    small = read_image(tmp_path / "big.jpg", needed_size=transform.needed_size)
    # 1600x1000 -> 410x256 needed: the 1/2 DCT scale (800x500) is the smallest at least that big.
    assert small.size == (800, 500) and small.info["original_size"] == (1600, 1000)
    pixels, placement = transform(small)
    assert placement.image_size == (1000, 1600) and placement.box == pytest.approx((0.0, 0.0, 1600.0, 1000.0))
    full_pixels, _ = transform(read_image(tmp_path / "big.jpg"))
    assert pixels.shape == full_pixels.shape == (3, 256, 416)
    assert np.abs(pixels - full_pixels).mean() < 0.05  # the same picture, resampled from another scale
    # A turned JPEG: the needed size is asked for upright, the draft made on the stored orientation.
    _rotated_jpeg(tmp_path / "turned.jpg", 6)
    turned = read_image(tmp_path / "turned.jpg", needed_size=lambda w, h: (w // 2, h // 2))
    assert turned.info["original_size"] == (20, 40) and turned.size == (10, 20)


def test_a_photo_turned_after_reading_is_scored_at_its_own_size(tmp_path, fitted_model):
    """``read_image`` records a reduced JPEG's own size in ``info``; PIL keeps ``info`` through
    ``transpose``, so a photo turned by the caller afterwards must not be placed at the size of
    the photo before the turn (its map came out 500x750 for a 750x500 photo turned upright)."""
    from patchcore.engine.geometry import photo_size

    rng = np.random.default_rng(4)
    Image.fromarray((rng.random((50, 75, 3)) * 255).astype(np.uint8)).save(tmp_path / "wide.png")
    photo = read_image(tmp_path / "wide.png")
    upright = photo.transpose(Image.ROTATE_90)
    assert upright.info["original_size"] == (75, 50)  # PIL's own behaviour, the reason for photo_size
    assert photo_size(photo) == (75, 50) and photo_size(upright) == (50, 75)
    prediction = fitted_model.predict([upright], maps=True)[0]
    assert prediction.anomaly_map.shape == (75, 50)
    # A reduced decode is still placed at the photo's own size.
    reduced = photo.resize((38, 25))
    reduced.info["original_size"] = (75, 50)
    assert photo_size(reduced) == (75, 50)
    cropped = photo.crop((0, 0, 40, 30))
    assert photo_size(cropped) == (40, 30)
