"""Any image Pillow decodes -> 8-bit RGB, and the pixel limit that keeps decompression bombs out.

Every data path goes through here: the trainer's Pillow decode (`prx.data.webdata`), the shard
scan (`prx.data.shards`) and `prx.data.prepare`. Pillow's `convert("RGB")` alone gets three kinds
of file wrong:
  * gray with more than 8 bits (PNG/TIFF modes I;16, I;16B, I; float F) is clipped at 255, so a
    16-bit photo trains as near-white (every value above 255 of 65535 becomes 255);
  * alpha (RGBA, LA, PA, a palette or a gray/RGB colour key marked transparent) is dropped, so a
    transparent pixel shows whatever colour it happens to store, often black or junk;
  * a file over Pillow's pixel limit only warns below twice the limit (one warning per file).

The rules, one per kind of mode:
  * integers wider than 8 bits keep their top 8 bits: a 16-bit v becomes v >> 8. Pillow already
    does this to 16-bit colour PNGs (they open as 8-bit RGB holding the high byte), so a gray and
    a colour 16-bit file of one picture agree; round(v * 255 / 65535) would differ by at most 1.
    The width is the file's: 16 for I;16*, the TIFF's bits per sample for I (16 or 32; a signed
    format keeps its 0 and clips negatives to 0), 16 for I from other files (Pillow's PGM reader
    scales any maxval to 16 bits);
  * floats (F) are 0..1, clipped: the float-image convention of scikit-image, OpenCV and tifffile;
  * alpha is composited over white, c * a / 255 + 255 * (1 - a / 255) rounded: a transparent
    image looks like that on the page its caption comes from, and img2dataset (the downloader of
    LAION and DataComp) does the same, so our pixels match the datasets made with it;
  * palette images go through their palette; CMYK, YCbCr, LAB and HSV through Pillow's own
    conversions (an embedded ICC profile is not applied: neither Pillow nor DALI apply one).

The pixel limit is Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485 by default: a 0.25 GiB RGB
decode, above the 61 MP of the largest full-frame camera sensors), read at each call so a user who
raises it in code is obeyed. Over it, `open_image` raises `ImageTooLarge` before any pixel is
decoded, without Pillow's warning; callers count the sample as bad like a corrupt one.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image

WHITE = 255
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 258, 339, 2  # TIFF tags and the signed format


class ImageTooLarge(Image.DecompressionBombError):
    """More pixels than PIL.Image.MAX_IMAGE_PIXELS (a subclass of Pillow's own error)."""


# What a broken or hostile image can raise from Pillow, beyond OSError (which covers truncated data and
# Pillow's UnidentifiedImageError): bad header fields (ValueError, SyntaxError, struct.error), data
# ending early (EOFError) and the pixel limit.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def open_image(data: bytes) -> Image.Image:
    """Image.open on encoded bytes, lazily (header only), refusing images over the pixel limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, without a warning
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:  # over twice the limit: Pillow refuses it itself
            raise ImageTooLarge(str(err)) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise ImageTooLarge(f"image of {im.width}x{im.height} = {im.width * im.height:,} pixels is over the "
                            f"limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)")
    return im


def is_plain_rgb8(im: Image.Image) -> bool:
    """8-bit gray or RGB without transparency: the images any decoder (Pillow, DALI, nvJPEG) turns
    into the same RGB. Call it on a freshly opened image (before `load`, which drops `tile`)."""
    if im.mode not in ("L", "RGB") or "transparency" in im.info:
        return False
    # Pillow opens 16-bit colour PNGs as 8-bit "RGB"; only the decoder's raw mode ("RGB;16B") says so.
    for tile in getattr(im, "tile", None) or ():
        rawmode = tile.args[0] if isinstance(tile.args, tuple) and tile.args else tile.args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return False
    return True


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow image -> mode RGB, 8 bits per channel, by the rules in the module docstring."""
    mode, keyed = im.mode, "transparency" in im.info  # keyed: a palette entry or colour marked transparent
    if mode == "RGB" and not keyed:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):  # (a colour key on 16-bit gray is ignored: rare)
        return Image.fromarray(_gray_to_uint8(im)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or keyed:
        return _over_white(im.convert("RGBA"))
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's conversions


def _gray_to_uint8(im: Image.Image) -> np.ndarray:
    values = np.asarray(im)
    if im.mode == "F":
        return np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    bits, signed = 16, False
    if im.mode == "I" and hasattr(im, "tag_v2"):  # a TIFF says how wide its samples are
        bits = int(np.max(im.tag_v2.get(TIFF_BITS_PER_SAMPLE, 32)))
        signed = TIFF_SAMPLE_FORMAT in im.tag_v2 and TIFF_SIGNED in np.atleast_1d(im.tag_v2[TIFF_SAMPLE_FORMAT])
    top = bits - 1 if signed else bits  # the sign bit carries no brightness
    values = np.clip(values.astype(np.int64), 0, (1 << top) - 1)
    return (values >> (top - 8)).astype(np.uint8)


def _over_white(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba).astype(np.uint32)
    color, alpha = pixels[..., :3], pixels[..., 3:]
    # (x + 127) // 255 is round(x / 255) exactly: x / 255 is never half-way, as 255 is odd.
    blended = (color * alpha + WHITE * (255 - alpha) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))
