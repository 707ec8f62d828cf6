"""Image files of every common PIL mode load as the right 8-bit RGB (issue #11: a 16-bit greyscale PNG was
scored as an image 99.5 % white)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rewardtune.images import load_image


def _png16_rgb(path, arr: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _pixel(path, y=0, x=0) -> list[int]:
    return [round(v * 255) for v in load_image(path)[:, y, x].tolist()]


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)  # 0, 64, 128 (rounded), 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (3, 1, 4)
    assert [round(v * 255) for v in img[0, 0].tolist()] == [0, 64, 128, 255]
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()


def test_32_bit_integer_and_float_greyscale(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert _pixel(tmp_path / "i32.tif", 0, 1) == [255, 255, 255] and _pixel(tmp_path / "i32.tif") == [0, 0, 0]
    Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert _pixel(tmp_path / "f.tif", 0, 1) == [128, 128, 128]


def test_16_bit_rgb_palette_cmyk_and_rgba(tmp_path):
    rgb16 = np.zeros((2, 2, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1] = 65535, 32896  # 32896 / 257 = 128
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    assert _pixel(tmp_path / "rgb16.png") == [255, 128, 0]

    pal = Image.new("P", (2, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert _pixel(tmp_path / "pal.png", 0, 1) == [200, 100, 50]
    assert _pixel(tmp_path / "pal.png") == [10, 20, 30]  # alpha dropped, colour kept (as CLIPProcessor does)

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")  # pure red in CMYK
    assert _pixel(tmp_path / "cmyk.tif") == [255, 0, 0]

    Image.new("RGBA", (2, 2), (0, 0, 255, 0)).save(tmp_path / "rgba.png")
    assert _pixel(tmp_path / "rgba.png") == [0, 0, 255]


@pytest.mark.parametrize(
    "mode,value,expected", [("L", 77, [77, 77, 77]), ("LA", (77, 0), [77, 77, 77]), ("1", 1, [255, 255, 255])]
)
def test_8_bit_and_binary_greyscale(tmp_path, mode, value, expected):
    Image.new(mode, (2, 2), value).save(tmp_path / "x.png")
    assert _pixel(tmp_path / "x.png") == expected
