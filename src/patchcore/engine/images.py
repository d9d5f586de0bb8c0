"""Reading images of any common kind, and decoding them in batches for the network."""

from __future__ import annotations

import io
import itertools
import os
import struct
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError
from . import png_decoding
from .augmentation import Augmenter
from .geometry import Placement

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class FetchedImage:
    """An image file that is not on this machine's disk, read when it is decoded: ``fetch()``
    returns the file's bytes, ``name`` (its address, e.g. an ``s3://`` URI) names it in results
    and errors. Lets a Ray worker read photos from any file system without the engine knowing
    of it (``fetch`` must be picklable to travel: a module-level function or a ``partial``)."""

    name: str
    fetch: Callable[[], bytes]


#: What ``fit`` and ``predict`` accept as one image.
ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, FetchedImage]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Entries with an image suffix that cannot be used (a link to nothing, a file without read
    permission, a folder named like an image) are left out with one warning that says how many
    and why.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageLoadError(str(folder), "not a folder")
    files, unusable = [], []
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if entry.is_file() and os.access(entry, os.R_OK):
            files.append(entry)
        elif entry.is_symlink() and not entry.exists():
            unusable.append(f"{entry.name} (link to a missing file)")
        elif entry.is_file():
            unusable.append(f"{entry.name} (not readable: permission denied)")
        else:
            unusable.append(f"{entry.name} (not a regular file)")
    if unusable:
        shown = "; ".join(unusable[:5]) + ("; ..." if len(unusable) > 5 else "")
        warnings.warn(f"{folder}: skipped {len(unusable)} unusable entr{'y' if len(unusable) == 1 else 'ies'}: {shown}",
                      stacklevel=2)
    if not files:
        raise ImageLoadError(str(folder), f"folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def expand_sources(images: ImageSource | Iterable[ImageSource]) -> list[ImageSource]:
    """Flatten one image, a folder, or a list of both into a list of single image sources."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, FetchedImage)):
        images = [images]
    sources: list[ImageSource] = []
    for item in images:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            sources.extend(list_images(item))
        else:
            sources.append(item)
    if not sources:
        raise ValueError("no images given")
    return sources


def source_name(source: ImageSource | bytes, position: int) -> str:
    """A name for error messages and result tables: the path, or ``<image N>``."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, FetchedImage):
        return source.name
    return getattr(source, "filename", None) or f"<image {position}>"


def unique_names(stems: list[str]) -> list[str]:
    """File-name stems made unique by appending the position to repeats (``a``, ``a-3``)."""
    names, seen = [], set()
    for position, stem in enumerate(stems):
        name = stem if stem not in seen else f"{stem}-{position}"
        seen.add(name)
        names.append(name)
    return names


def integer_peak(dtype: np.dtype, bits: int | None = None) -> int:
    """The integer value that means white: ``2**bits - 1`` when the image's file declares its bit
    depth (:func:`declared_bits`), else a rule by pixel type, never by content (a dark 16-bit
    photo holds only small values, yet is no 8-bit photo):

    * 8-bit types (``uint8``, ``int8``): 255;
    * ``uint16`` and ``int16``: 65535;
    * ``int32``: 65535 too, since that is how Pillow hands out 16-bit images (mode ``"I"``);
    * wider types (``uint32``, ``int64``, ...) say nothing about their range (NumPy's default
      ``int64`` holds 8-bit photos as often as anything else), so they are refused with a
      ``ValueError`` that asks for ``uint8`` or ``uint16``.

    12-bit data in 16-bit arrays therefore needs its file's declaration, or scaling by the caller.
    """
    dtype = np.dtype(dtype)
    if bits is not None:
        return 2**bits - 1
    if dtype.itemsize == 1:
        return 255
    if dtype.itemsize == 2 or dtype == np.int32:
        return 65535
    raise ValueError(f"image array of type {dtype} has no known bit depth: convert it to uint8 (0-255) "
                     "or uint16 (0-65535)")


def _to_uint8(array: np.ndarray, bits: int | None = None) -> np.ndarray:
    """8-bit pixels from integers of ``bits`` bits (None: by type, see :func:`integer_peak`) or
    from floats (in [0, 1], else taken as 0-255)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        peak = integer_peak(array.dtype, bits)
        return np.clip(np.rint(array.astype(np.float64) * (255.0 / peak)), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image holds NaN or infinite values")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {array.dtype}")


def array_to_rgb(array: np.ndarray, bits: int | None = None) -> Image.Image:
    """An RGB image from an HxW, HxWx1, HxWx3 or HxWx4 array (alpha is dropped); integer samples
    of ``bits`` bits (None: by type, see :func:`integer_peak`)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(_to_uint8(array, bits)[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        array = _to_uint8(array[:, :, :3], bits)
    else:
        raise ValueError(f"array of shape {array.shape} is not an image (HxW, HxWx1, HxWx3 or HxWx4)")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"image of size {array.shape[1]}x{array.shape[0]} is empty")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _wide_integers(mode: str) -> bool:
    """Whether Pillow mode ``mode`` holds integer samples wider than 8 bits (``I``, ``I;16``, ...)."""
    return mode == "I" or mode.startswith("I;")


def to_rgb(image: Image.Image, bits: int | None = None) -> Image.Image:
    """RGB version of a PIL image of any mode: 16-bit, float, grayscale, palette, RGBA, CMYK.

    ``bits``: the bit depth the image's file declares for its 16/32-bit integer samples
    (:func:`declared_bits`); None decides by pixel type (:func:`integer_peak`).
    """
    if image.mode == "RGB":
        return image
    if _wide_integers(image.mode) or image.mode == "F":
        return array_to_rgb(np.asarray(image), bits if _wide_integers(image.mode) else None)
    if image.mode in ("LA", "PA", "P", "RGBa", "La"):
        image = image.convert("RGBA")  # via RGBA so that palette and alpha modes convert cleanly
    return image.convert("RGB")


#: TIFF tag BitsPerSample.
_BITS_PER_SAMPLE = 258
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def declared_bits(image: Image.Image, file: str | os.PathLike | bytes | bytearray | memoryview | None = None) -> int | None:
    """The bits per sample that the file of a loaded 16/32-bit integer ``image`` declares; None for
    other images, or when the file declares nothing (then the pixel type decides).

    TIFF: BitsPerSample (12 for 12-bit data, which Pillow unpacks to 0-4095). PNG (read from
    ``file``, its path or bytes, since Pillow keeps no sBIT): the sBIT chunk's significant bits
    when every sample fits in them (12-bit data stored as 0-4095 in 16-bit samples, as cameras
    write it), else the header's bit depth (samples scaled up to it, the PNG standard's way).
    """
    if not _wide_integers(image.mode):
        return None
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(_BITS_PER_SAMPLE)
        bits = max(bits) if isinstance(bits, tuple) and bits else bits
        return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None
    if image.format == "PNG" and file:
        try:
            depths = _png_bit_depths(file)
        except OSError:  # the file of a PIL image handed to us may be gone since; its type decides
            return None
        if depths is None:
            return None
        depth, significant = depths
        if significant is not None and image.getextrema()[1] <= 2**significant - 1:
            return significant
        return depth
    return None


def _png_bit_depths(file: str | os.PathLike | bytes | bytearray | memoryview) -> tuple[int, int | None] | None:
    """(bit depth, sBIT significant bits or None) from a PNG's header chunks; None if not a PNG.

    Only the chunks before the image data are read: sBIT must precede PLTE and IDAT.
    """
    with (open(file, "rb") if isinstance(file, (str, os.PathLike)) else io.BytesIO(file)) as data:
        if data.read(8) != _PNG_SIGNATURE:
            return None
        depth = colour = None
        while len(head := data.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"PLTE", b"IDAT", b"IEND"):
                break
            if kind not in (b"IHDR", b"sBIT"):
                data.seek(length + 4, io.SEEK_CUR)  # the chunk and its CRC
                continue
            body = data.read(length)
            data.seek(4, io.SEEK_CUR)
            if kind == b"IHDR" and len(body) >= 10:
                depth, colour = body[8], body[9]
            elif kind == b"sBIT" and depth:
                channels = body[:3] if colour & 2 else body[:1]  # colour types 2 and 6: R, G, B
                if channels and all(1 <= bits <= depth for bits in channels):
                    return depth, max(channels)
        return (depth, None) if depth else None


def read_image(
    source: ImageSource | bytes,
    position: int = 0,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
    needed_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Load ``source`` (a path, PIL image, array, or the bytes of an image file) as an RGB PIL image.

    The camera's EXIF orientation is applied, so the image is upright as every viewer shows it.
    ``max_pixels`` refuses larger images from their header, before any pixel is decoded;
    ``formats`` limits the decoders tried (e.g. for uploads). Any failure is an
    :class:`ImageLoadError` naming the image (``name``, else the path or ``<image N>``).

    ``needed_size`` maps the photo's upright (width, height) to the smallest size the caller will
    use; a JPEG is then decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that is at least
    that big, several times faster than decoding every pixel. The photo's own upright size is kept
    in ``image.info["original_size"]``.

    PNG pixels come from libspng where it is installed and gives Pillow's result exactly
    (:mod:`~patchcore.engine.png_decoding`); Pillow still reads the header first, so size limits,
    accepted formats and errors in the header are checked as for every other image.
    """
    name = name or source_name(source, position)
    if isinstance(source, FetchedImage):
        try:
            source = source.fetch()
        except Exception as exc:  # any file system's failure to deliver the file: a bad image
            raise ImageLoadError(name, f"could not be read ({type(exc).__name__}: {exc})") from None
    if isinstance(source, (np.ndarray, Image.Image)):
        try:
            if isinstance(source, np.ndarray):
                return array_to_rgb(source)
            return to_rgb(source, declared_bits(source, getattr(source, "filename", None)))
        except ValueError as exc:  # an image of no usable shape or type: say which and why
            raise ImageLoadError(name, str(exc)) from None
    try:
        data = None  # the file's bytes, when its pixels may come from libspng
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise ImageLoadError(name, "empty image data (zero bytes)")
            data = source
            stream = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(name, "file not found" if not path.exists() else "not a file")
            data = _png_file_bytes(path) if png_decoding.available() else None
            stream = path if data is None else io.BytesIO(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream, formats=formats) as opened:
                _check_pixels(name, opened.width, opened.height, max_pixels)
                if data is not None and opened.format == "PNG" and (fast := _libspng_image(opened, data)) is not None:
                    return fast
                turned = opened.getexif().get(_ORIENTATION, 1) in _TURNED
                original = (opened.height, opened.width) if turned else opened.size
                if needed_size is not None and opened.format == "JPEG":
                    width, height = needed_size(*original)
                    opened.draft("RGB", (height, width) if turned else (width, height))
                opened.load()
                _check_pixels(name, opened.width, opened.height, max_pixels)  # some formats settle their size on load
                # The bit depth comes from the file (turning the photo drops its TIFF tags).
                bits = declared_bits(opened, source)
                image = to_rgb(ImageOps.exif_transpose(opened), bits)
                image.load()
                if image is opened:
                    image = image.copy()
                image.info["original_size"] = original
        if image.width < 1 or image.height < 1:
            raise ImageLoadError(name, "image has no pixels")
        return image
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels(name, f"image is too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        if formats:
            raise ImageLoadError(name, f"not an image, or not one of the accepted formats ({', '.join(formats)})") from None
        raise ImageLoadError(name, "not an image file, or an image format Pillow cannot read") from None
    except MemoryError:
        raise TooManyPixels(name, "image is too large to decode safely (out of memory while decoding)") from None
    except Exception as exc:  # decoders raise many kinds on hostile input; all mean "bad image"
        raise ImageLoadError(name, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def _png_file_bytes(path: Path) -> bytes | None:
    """The bytes of the file at ``path`` if it is a PNG (for libspng), else None (Pillow reads it)."""
    with open(path, "rb") as file:
        head = file.read(len(png_decoding.SIGNATURE))
        return head + file.read() if head == png_decoding.SIGNATURE else None


def _libspng_image(opened: Image.Image, data: bytes | bytearray | memoryview) -> Image.Image | None:
    """The RGB image of the PNG that Pillow ``opened`` from ``data``, its pixels decoded by
    libspng; None where Pillow must decode them (:func:`png_decoding.decode_png`)."""
    layout = png_decoding.png_layout(data)
    if layout is None or (layout.width, layout.height) != opened.size:
        return None
    pixels = png_decoding.decode_png(data, layout)
    if pixels is None:
        return None
    image = Image.fromarray(pixels)
    image.info["original_size"] = opened.size
    return image


#: EXIF orientation tag; its values 5-8 turn the photo by 90 degrees (width and height swap).
_ORIENTATION = 0x0112
_TURNED = frozenset({5, 6, 7, 8})


class TooManyPixels(ImageLoadError):
    """An image larger than the size limit (a decompression bomb, or simply too big)."""


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if width < 1 or height < 1:
        raise ImageLoadError(name, "image has no pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(name, f"image of {width}x{height} pixels is too large to decode safely (limit {max_pixels} pixels)")


#: With augmentation, the most batches of copies of different input sizes kept open at once.
MAX_OPEN_BATCHES = 8


@dataclass
class LoadedBatch:
    """A batch of network inputs with what is needed to map results back to each image."""

    names: list[str]
    pixels: np.ndarray  # (batch, 3, H, W) float32, normalised
    placements: list[Placement]
    #: The decoded photos (only when asked for), else ``None`` each.
    images: list[Image.Image | None]
    #: Of each input: (its source's position in the list, which copy of it: 0 the photo itself).
    keys: list[tuple[int, int]]


def iterate_batches(
    sources: list[ImageSource],
    transform: Callable[[Image.Image], tuple[np.ndarray, Placement]],
    batch_size: int,
    workers: int = 2,
    on_error: Callable[[ImageLoadError], None] | None = None,
    keep_images: bool = False,
    augment: Augmenter | None = None,
) -> Iterator[LoadedBatch]:
    """Decode and transform images in background threads, yielding them in order, in batches.

    Images whose network inputs differ in size (photos of other sizes or shapes) go into separate
    batches, so a batch may hold fewer than ``batch_size`` images. A bad image raises
    :class:`ImageLoadError`, or, with ``on_error``, is reported to it and left out. With
    ``keep_images`` each batch also carries the decoded photos.

    ``augment`` (fitting only: :class:`~patchcore.engine.augmentation.Augmenter`) turns each
    input into several (turned, mirrored copies), in the decoding threads, as each photo is
    decoded: fewer photos are then in flight, so that about two batches of copies are. The
    copies are batched by input size (a turned copy of a non-square photo has its own), so
    batches are then not in the order of ``sources``; each input keeps its source's name.
    """

    # JPEGs are decoded at the smallest DCT scale the network input needs (see read_image); kept
    # photos are those, with their own size in info["original_size"].
    needed_size = getattr(transform, "needed_size", None)

    def load(item: tuple[int, ImageSource]):
        position, source = item
        image = read_image(source, position, needed_size=needed_size)
        try:
            pixels, placement = transform(image)
        except ValueError as exc:
            raise ImageLoadError(source_name(source, position), str(exc)) from exc
        name, kept = source_name(source, position), image if keep_images else None
        if augment is None:
            return name, pixels, placement, kept, (position, 0)
        return [(name, copy, where, kept, (position, number)) for number, (copy, where) in enumerate(augment(pixels, placement))]

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="patchcore-decode")
    pending: deque = deque()
    # Keep two batches in flight: enough to hide decoding, bounded in memory.
    in_flight = 2 * batch_size if augment is None else max(1, -(-2 * batch_size // augment.copies))
    try:
        items = enumerate(sources)
        batch: list = []
        groups: dict[tuple, list] = {}  # with augment: the open batch of each input size
        while True:
            for item in itertools.islice(items, in_flight - len(pending)):
                pending.append(pool.submit(load, item))
            if not pending:
                break
            try:
                item = pending.popleft().result()
            except ImageLoadError as error:
                if on_error is None:
                    raise
                on_error(error)
                continue
            if augment is not None:
                for copy in item:
                    group = groups.setdefault(copy[1].shape, [])
                    group.append(copy)
                    if len(group) == batch_size:
                        yield _collate(groups.pop(copy[1].shape))
                while len(groups) > MAX_OPEN_BATCHES:  # photos of many sizes: the oldest open batch goes
                    yield _collate(groups.pop(next(iter(groups))))
                continue
            if batch and item[1].shape != batch[0][1].shape:
                yield _collate(batch)
                batch = []
            batch.append(item)
            if len(batch) == batch_size:
                yield _collate(batch)
                batch = []
        if batch:
            yield _collate(batch)
        for group in groups.values():
            yield _collate(group)
    finally:
        # Stopped early (an error, Ctrl-C, the caller closing the generator): drop the queued
        # decodes instead of waiting for them (`with` would: 1.7 s for bottle at batch 16), and do
        # not wait for those running either; their results are not wanted.
        pool.shutdown(wait=False, cancel_futures=True)


def _collate(items: list) -> LoadedBatch:
    names, pixels, placements, images, keys = zip(*items)
    return LoadedBatch(list(names), np.stack(pixels), list(placements), list(images), list(keys))
