"""Every kind of bad or unusual image input gives an RGB array or a clear ImageError, never a traceback."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from models.errors import ImageError
from models.imageio import ImageLimits, list_images, load_image


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h=40, w=60):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_plain_jpeg_and_png_roundtrip(tmp_path):
    arr = _rgb()
    p = tmp_path / "a.png"
    p.write_bytes(_encode(Image.fromarray(arr)))
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    assert np.array_equal(out, arr)
    jpg = load_image(_encode(Image.fromarray(arr), "JPEG", quality=95))
    assert jpg.shape == (40, 60, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is plainly not an image, just some text\n" * 10, "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt or truncated|not a recognised"),
    ],
)
def test_rejects_empty_and_non_images(data, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(data)


def test_truncated_jpeg_is_rejected():
    full = _encode(Image.fromarray(_rgb(200, 200)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(full[: len(full) // 2])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "zero.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(p)


def test_grayscale_rgba_palette_and_cmyk_become_rgb():
    arr = _rgb()
    gray = load_image(_encode(Image.fromarray(arr[:, :, 0])))
    assert gray.shape == (40, 60, 3) and np.array_equal(gray[:, :, 0], arr[:, :, 0])
    rgba = np.dstack([arr, np.full((40, 60), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel composites onto white
    out = load_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (40, 60, 3) and tuple(out[0, 0]) == (255, 255, 255) and np.array_equal(out[1:], arr[1:])
    pal = load_image(_encode(Image.fromarray(arr).convert("P")))
    assert pal.shape == (40, 60, 3)
    cmyk = load_image(_encode(Image.fromarray(arr).convert("CMYK"), "JPEG"))
    assert cmyk.shape == (40, 60, 3)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)
    out = load_image(_encode(Image.fromarray(ramp)))
    assert out.shape == (8, 8, 3)
    # 16-bit 65535 is white: PIL's own conversion would clip everything above 255 to white
    assert out[0, 0, 0] == 0 and 250 <= out[-1, -1, 0] <= 255 and 120 <= out[4, 0, 0] <= 135


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=100))
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size: the guard must fire on the header, before any pixel is decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_20000_by_20000_image_is_refused_from_its_header():
    with pytest.raises(ImageError, match=r"too large.*400000000 pixels"):
        load_image(_png_header_only(20000, 20000))
    # below PIL's own bomb limit, our (lower) limit fires
    with pytest.raises(ImageError, match="too large: 8000x8000 pixels exceeds the limit"):
        load_image(_png_header_only(8000, 8000))


def test_byte_limit(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(_encode(Image.fromarray(_rgb(100, 100))))
    with pytest.raises(ImageError, match="byte limit"):
        load_image(p, ImageLimits(max_bytes=100))


def test_list_images_expands_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_text("no")
    (tmp_path / "b.png").write_bytes(b"1")
    found = list_images([tmp_path / "a", tmp_path / "b.png"])
    assert [p.name for p in found] == ["x.jpg", "b.png"]
