"""Turn an image row's bytes into RGB pixels, refusing bad input before it costs memory.

Every refusal is an :class:`InputError` with a message that says what was wrong (it is written on the row):
empty data, a type that is not an allowed image format, dimensions over ``max_image_pixels`` (read from the
header, before a single pixel is decoded: a decompression bomb never inflates), truncated or corrupt data.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pgsynapse.config import Settings
from pgsynapse.errors import InputError

# the decoders Pillow may try: common web formats only (every extra decoder is attack surface)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
# the files `pgsynapse ingest` takes as images: every format the worker decodes
EXTENSIONS = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
              ".gif": "image/gif", ".bmp": "image/bmp"}

# a truncated file is an error, never a half-grey picture
ImageFile.LOAD_TRUNCATED_IMAGES = False
# max_image_pixels (checked in decode(), before decoding) replaces Pillow's own bomb limit, which would refuse
# images under a higher configured cap and word the error its own way
Image.MAX_IMAGE_PIXELS = None

# what the first bytes of common non-image uploads say, for a clearer "not an image" message
_SIGNATURES = (
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "gzip data"),
    (b"BZh", "bzip2 data"),
    (b"\x7fELF", "an ELF executable"),
    (b"<svg", "an SVG document (vector images are not supported)"),
    (b"<?xml", "an XML document"),
    (b"GIF8", "a GIF image"),
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    # decoded pixels are kept at most this size on their longer side (models look at a few hundred pixels):
    # a batch of large photos holds megabytes, not gigabytes (JPEG is even decoded at reduced scale)
    keep_side: int = 1024

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


@dataclass
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied, first frame of an animation, at most keep_side
    format: str
    mime_type: str
    width: int  # of the image as stored
    height: int


def _what(data: bytes) -> str:
    head = data[:64].lstrip()
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head and all(32 <= b < 127 or b in b"\t\n\r\f\v" for b in head):  # printable: NUL bytes are no text
        return "text"
    return f"{len(data):,} bytes starting {data[:8].hex(' ')}"


def decode(data: bytes, limits: ImageLimits) -> Decoded:
    """Decode ``data`` into an RGB image, or raise :class:`InputError` saying why not."""
    if not data:
        raise InputError("empty image data (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InputError(f"image has {len(data):,} bytes, over max_image_bytes={limits.max_bytes:,}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # open() reads the header only: the dimensions are known before any pixel is decoded
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise InputError(f"not an image in an allowed format ({', '.join(FORMATS)}): {_what(data)}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image dimensions refused before decoding: {exc}") from None
        width, height = im.size
        if width <= 0 or height <= 0:
            raise InputError(f"image header has invalid dimensions {width}x{height}")
        if width * height > limits.max_pixels:
            raise InputError(f"image is {width}x{height} = {width * height:,} pixels, over "
                             f"max_image_pixels={limits.max_pixels:,} (refused before decoding)")
        fmt = im.format or "unknown"
        try:
            if fmt == "JPEG":
                im.draft("RGB", (limits.keep_side, limits.keep_side))  # DCT scaling: decode at 1/2, 1/4, 1/8
            im.load()
            im = ImageOps.exif_transpose(im)
            if max(im.size) > limits.keep_side:
                im.thumbnail((limits.keep_side, limits.keep_side), Image.Resampling.BICUBIC)
            rgb = _to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image refused while decoding: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(f"truncated or corrupt {fmt} image: {text}") from None
    return Decoded(rgb, fmt, MIME.get(fmt, f"image/{fmt.lower()}"), width, height)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent areas on white, as a viewer shows them
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def read_image_file(path: str, roots: tuple[Path, ...], limits: ImageLimits) -> bytes:
    """The bytes of an image row's ``path``: only under one of ``roots`` (the worker's ``image_roots``), only a
    regular file, never more than ``max_image_bytes``."""
    if not roots:
        raise InputError("image rows with a path need the worker's image_roots setting (PGSYNAPSE_IMAGE_ROOTS): "
                         "no directory is allowed; store the bytes in images.data instead")
    if not path:
        raise InputError("empty image path: give an absolute path under image_roots")
    if "://" in path:
        raise InputError(f"image path {path!r} is a URL: the worker reads no URL, only files under image_roots; "
                         "store the bytes in images.data")
    if not Path(path).is_absolute():  # relative to the worker's own directory, which the row's writer cannot know
        raise InputError(f"image path {path!r} is relative: give an absolute path under image_roots")
    try:
        real = Path(path).resolve()  # symlinks followed; whether it exists is said only inside the roots
    except (OSError, RuntimeError) as exc:
        raise InputError(f"cannot read image file {path!r}: {type(exc).__name__}: {exc}") from None
    if not any(real.is_relative_to(r.resolve()) for r in roots):
        raise InputError(f"image path {path!r} is outside image_roots ({', '.join(map(str, roots))})")
    if not real.exists():
        raise InputError(f"cannot read image file {path!r}: no such file")
    try:
        return read_bounded(real, limits.max_bytes)
    except InputError as exc:
        raise InputError(f"image file {path!r}: {exc}") from None


# what a file that is not a regular one is, for the refusal's message
_FILE_TYPES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _not_regular(mode: int) -> str | None:
    """Why a file of ``mode`` cannot be read as an image's bytes (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _FILE_TYPES if test(mode)), "not a file")
    return f"not a regular file ({what}): give an image file"


def read_bounded(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``, never more than ``max_bytes + 1`` of them read: a named pipe, a
    device or a directory is refused without a read (a pipe would wait for its writer, /dev/zero never end), a file
    over ``max_bytes`` by its size, or by what was read when it grew meanwhile. The refusals are an
    :class:`InputError` whose message is the reason alone (the caller names the file); ``OSError`` when it cannot
    be opened."""
    if why := _not_regular(os.stat(path).st_mode):
        raise InputError(why)
    # no wait for a writer, should a pipe have taken the file's place since
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if why := _not_regular(st.st_mode):
            raise InputError(why)
        if st.st_size > max_bytes:
            raise InputError(f"{st.st_size:,} bytes, over max_image_bytes={max_bytes:,}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"more than {max_bytes:,} bytes (it grew while it was read), over "
                         f"max_image_bytes={max_bytes:,}")
    return data
