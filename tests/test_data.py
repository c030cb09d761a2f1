"""Input side: deterministic listing, decoding of every PIL mode, EXIF orientation, broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BROKEN, SAMPLES
from xaicli.data import DecodeError, DecodeLimits, decode_image, list_images
from xaicli.errors import InputError


def test_listing_is_recursive_sorted_and_skips_hidden_and_out(tmp_path: Path):
    for rel in ["b/z.png", "a.jpg", "b/a.PNG", "c/d/e.webp", ".hidden/x.png", "b/.x.png", "notes.txt", "out/o.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    listed = list_images(tmp_path, exclude=tmp_path / "out")
    assert [e.rel for e in listed.entries] == ["a.jpg", "b/a.PNG", "b/z.png", "c/d/e.webp"]
    assert listed.ignored == 1


def test_missing_input():
    with pytest.raises(InputError, match="input not found"):
        list_images(Path("/no/such/folder"))


def test_single_file_input():
    listed = list_images(SAMPLES / "chelsea.png")
    assert [e.rel for e in listed.entries] == ["chelsea.png"]


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda: Image.new("L", (5, 4), 100)),
        ("1", lambda: Image.new("1", (5, 4), 1)),
        ("P", lambda: Image.new("RGB", (5, 4), (10, 200, 30)).convert("P")),
        ("CMYK", lambda: Image.new("CMYK", (5, 4), (0, 0, 0, 0))),
        ("I;16", lambda: Image.fromarray(np.full((4, 5), 65535, np.uint16))),
        ("F", lambda: Image.fromarray(np.full((4, 5), 0.5, np.float32))),
    ],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode, make):
    im = make()
    fmt = {"CMYK": "TIFF", "F": "TIFF"}.get(mode, "PNG")
    p = _save(tmp_path, f"x.{fmt.lower()}", im, format=fmt)
    t = decode_image(p)
    assert t.shape == (3, 4, 5) and str(t.dtype) == "torch.uint8"
    if mode == "I;16":
        assert int(t.max()) == 255  # 16-bit scaled, not clipped garbage
    if mode == "F":
        assert int(t[0, 0, 0]) == 127  # 0.5 of the range (127.5, truncated)


def test_alpha_is_composited_on_white(tmp_path: Path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red, fully transparent on the left half
    arr[:, 2:, 3] = 255
    p = _save(tmp_path, "a.png", Image.fromarray(arr, "RGBA"))
    t = decode_image(p)
    assert t[:, 0, 0].tolist() == [255, 255, 255]
    assert t[:, 0, 3].tolist() == [255, 0, 0]
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    t = decode_image(_save(tmp_path, "p.png", pal, transparency=0))
    assert t[:, 0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_honoured(tmp_path: Path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white, 10 high x 20 wide
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "r.jpg"
    im.save(p, exif=exif, quality=95)
    t = decode_image(p)
    assert t.shape == (3, 20, 10)  # displayed upright: 20 high x 10 wide
    assert t[:, :8, :].float().mean() > 200 and t[:, 12:, :].float().mean() < 50


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("empty.jpg", "empty"),
        ("truncated.jpg", "decode"),
        ("truncated.png", "decode"),
        ("random_bytes.png", "decode"),
        ("text_as.png", "decode"),
        ("photo.heic", "unsupported"),
    ],
)
def test_broken_files_raise_decode_error(name, kind):
    with pytest.raises(DecodeError) as e:
        decode_image(BROKEN / name)
    assert e.value.kind == kind
    assert e.value.message


def test_decompression_bomb_is_refused(tmp_path: Path):
    """input.max_pixels is the guard (Pillow's own global is not what decides)."""
    p = _save(tmp_path, "big.png", Image.new("RGB", (40, 40)))
    with pytest.raises(DecodeError) as e:
        decode_image(p, DecodeLimits(max_pixels=100))
    assert e.value.kind == "too_large" and "input.max_pixels" in e.value.message
    assert decode_image(p, DecodeLimits(max_pixels=1600)).shape == (3, 40, 40)


def test_sample_images_decode():
    for p in sorted(SAMPLES.iterdir()):
        if p.suffix in (".png", ".jpg"):
            t = decode_image(p)
            assert t.shape[0] == 3
