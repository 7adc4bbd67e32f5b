"""Bad data through the real commands (`prx.data.prepare.main`, `train.cli`) and the shard reader:
every image mode Pillow decodes becomes the right 8-bit RGB (checked against pixel values worked
out by hand), decompression bombs and captions without images are counted, a damaged shard index
is rebuilt like a missing one, and a bad flag or path is one line with exit status 2 before
anything is written."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from prx.data import prepare
from prx.data.images import ImageTooLarge, open_image, to_rgb8
from prx.data.shards import INDEX_DTYPE, ShardSet, index_path, load_index, scan_shard, write_index
from prx.data.webdata import decode_image
from tests.test_data_reader import encode, make_shards, smooth_image, write_tar
from tests.test_faults_config import one_error_line
from tests.test_train import SMALL


def png(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG", **kw)
    return out.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    with open_image(data) as im:
        return np.asarray(to_rgb8(im))


# ----------------------------------------------------------------------------- every mode -> 8-bit RGB

GRAY16 = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
GRAY16_AS_8 = [0, 0, 1, 128, 255]  # the top 8 bits: v >> 8


def gray16_png() -> bytes:
    data = png(Image.fromarray(GRAY16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")  # really a 16-bit file
    return data


def test_16_bit_gray_keeps_its_top_8_bits():
    # Pillow's convert("RGB") clips at 255: 256, 32768 and 65535 would all be white.
    assert rgb_of(gray16_png())[0].tolist() == [[v] * 3 for v in GRAY16_AS_8]


def test_32_bit_float_gray_is_0_to_1():
    out = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0, 7.0, -1.0]], dtype=np.float32)).save(out, "TIFF")
    assert [p[0] for p in rgb_of(out.getvalue())[0]] == [0, 64, 128, 255, 255, 0]


def test_alpha_is_composited_over_white():
    rgba = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [200, 100, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    # c * a / 255 + 255 * (1 - a / 255), rounded: 200 -> 227.4, 100 -> 177.2, 0 -> 127.0
    expected = [[255, 255, 255], [0, 0, 0], [227, 177, 127], [10, 20, 30]]
    assert rgb_of(png(Image.fromarray(rgba, "RGBA"))).tolist() == [expected]
    gray_alpha = Image.fromarray(np.array([[[0, 0], [100, 255], [0, 51]]], dtype=np.uint8), "LA")
    assert [p[0] for p in rgb_of(png(gray_alpha))[0]] == [255, 100, 204]  # 255 * 204 / 255


def test_palette_goes_through_its_palette_and_its_transparent_entry_is_white():
    im = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    im.putpalette([250, 10, 20, 0, 128, 255, 7, 7, 7])
    assert rgb_of(png(im)).tolist() == [[[250, 10, 20], [0, 128, 255], [7, 7, 7]]]
    assert rgb_of(png(im, transparency=1)).tolist() == [[[250, 10, 20], [255, 255, 255], [7, 7, 7]]]


def test_cmyk_jpeg_becomes_its_rgb():
    # Pure cyan, magenta and yellow ink: R = 255 - C, G = 255 - M, B = 255 - Y (K = 0); JPEG is lossy.
    cmyk = np.zeros((16, 48, 4), dtype=np.uint8)
    cmyk[:, :16, 0] = cmyk[:, 16:32, 1] = cmyk[:, 32:, 2] = 255
    out = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(out, "JPEG", quality=95)
    rgb = rgb_of(out.getvalue()).astype(int)
    for column, expected in ((8, (0, 255, 255)), (24, (255, 0, 255)), (40, (255, 255, 0))):
        assert np.abs(rgb[8, column] - expected).max() <= 4, (column, rgb[8, column])


def bomb_png() -> bytes:
    """90 M pixels (the limit is 89,478,485) in about 11 KB: the shape of a decompression bomb."""
    return png(Image.new("1", (10_000, 9_000)))


def test_a_decompression_bomb_is_refused_before_decoding():
    data = bomb_png()
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="10000x9000"):
        open_image(data)
    with pytest.raises(ImageTooLarge):
        decode_image(data, 32, 32)


# ----------------------------------------------------------------------------- shards with such images

def odd_images_folder(root: Path) -> Path:
    """12 ordinary images, one of each odd mode, a bomb, a caption without image and an empty caption."""
    root.mkdir()
    for n in range(12):
        (root / f"plain{n:02d}.png").write_bytes(encode(smooth_image(40, 48, n), "PNG"))
        (root / f"plain{n:02d}.txt").write_text(f"plain {n}")
    flat16 = Image.fromarray(np.full((40, 48), 32768, dtype=np.uint16))  # mid-gray in 16 bits
    (root / "gray16.png").write_bytes(png(flat16))
    palette = Image.fromarray(np.zeros((40, 48), dtype=np.uint8), "P")
    palette.putpalette([30, 60, 90])
    (root / "palette.png").write_bytes(png(palette))
    (root / "clear.png").write_bytes(png(Image.new("RGBA", (48, 40), (0, 0, 0, 0))))
    (root / "bomb.png").write_bytes(bomb_png())
    for name in ("gray16", "palette", "clear", "bomb", "lost"):  # lost.txt: a caption without image
        (root / f"{name}.txt").write_text(f"{name} caption")
    (root / "silent.png").write_bytes(encode(smooth_image(40, 48, 99), "PNG"))
    (root / "silent.txt").write_text("   \n")  # an empty caption
    return root


def test_prepare_converts_odd_modes_and_counts_bombs_and_lost_captions(tmp_path, capsys):
    source, out = odd_images_folder(tmp_path / "src"), tmp_path / "out"
    assert prepare.main([str(source), str(out), "--workers", "1", "--quiet"]) == 0
    summary = json.loads((out / prepare.SUMMARY_FILE).read_text())
    assert summary["skipped"] == {"image too large": 1, "caption without image": 1, "image without caption": 1}
    assert "skipped: 1 caption without image, 1 image too large, 1 image without caption" in capsys.readouterr().out
    shards = ShardSet(sorted(out.glob("*.tar")))
    by_caption = dict(reversed(shards.read(i)) for i in range(len(shards)))
    assert len(by_caption) == 12 + 3
    assert (rgb_of(by_caption["gray16 caption"]) == 128).all()  # Pillow alone stores 255 here
    assert (rgb_of(by_caption["palette caption"]) == [30, 60, 90]).all()
    assert (rgb_of(by_caption["clear caption"]) == 255).all()


def test_the_trainer_reads_odd_modes_right_and_counts_bad_members(tmp_path, capsys):
    """A shard made by another tool (not prepare) with a 16-bit gray PNG, a bomb and a caption
    without image: trained on, the gray image is mid-gray, and the log counts the other two."""
    members = []
    for n in range(20):
        members += [(f"{n:04d}.jpg", encode(smooth_image(32, 32, n))), (f"{n:04d}.txt", f"caption {n}".encode())]
    flat16 = png(Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)))
    members += [("gray16.png", flat16), ("gray16.txt", b"gray"), ("bomb.png", bomb_png()), ("bomb.txt", b"bomb"),
                ("lost.txt", b"a caption without its image")]
    shard = write_tar(tmp_path / "odd.tar", members)
    assert (decode_image(flat16, 16, 16) == 128).all()
    code = train.cli(SMALL + ["--data", str(shard), "--set", "data.workers=0", "--steps", "2",
                              "--run-dir", str(tmp_path / "run")])
    assert code == 0
    assert "skipped while indexing: 1 caption without image, 1 image too large" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


# ----------------------------------------------------------------------------- a damaged index is rebuilt

def _rows_past_the_tar(path: Path, shard: Path) -> None:
    rows, report = scan_shard(shard)
    rows["image_offset"][0] = shard.stat().st_size  # reads past the end
    write_index(shard, rows, report)


def _rows_of_another_layout(path: Path, shard: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, rows=np.zeros(5, np.float64), tar_size=np.int64(shard.stat().st_size), version=np.int64(1),
                 bad=np.bytes_(b"{}"))


def _rows_as_objects(path: Path, shard: Path) -> None:  # an index that would need unpickling to read
    with open(path, "wb") as f:
        np.savez(f, rows=np.array([{"a": 1}], dtype=object), tar_size=np.int64(shard.stat().st_size),
                 version=np.int64(1), bad=np.bytes_(b"{}"))


def _flip_row_bytes(path: Path, shard: Path) -> None:
    data = bytearray(path.read_bytes())
    rows = scan_shard(shard)[0].tobytes()
    at = bytes(data).index(rows[:64]) + 8  # inside the first row's image size
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGES = {
    "cut in half": lambda path, shard: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path, shard: path.write_bytes(b""),
    "not a zip": lambda path, shard: path.write_text("index of shard 0\n"),
    "a flipped byte in the rows": _flip_row_bytes,
    "rows past the end of the tar": _rows_past_the_tar,
    "rows of another layout": _rows_of_another_layout,
    "rows that need unpickling": _rows_as_objects,
    "bad counts not JSON": lambda path, shard: write_index(shard, scan_shard(shard)[0], _BadReport()),
}


class _BadReport:  # write_index stores json.dumps(report.bad): a dict subclass that dumps as garbage
    bad = type("NotCounts", (dict,), {})([("x", "many")])


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_index_is_rebuilt_like_a_missing_one(tmp_path, damage):
    shard = make_shards(tmp_path / "shards", shards=1, per_shard=8)[0]
    good_rows, _ = load_index(shard)  # writes the index
    path = index_path(shard)
    assert path.exists()
    DAMAGES[damage](path, shard)
    rows, report = load_index(shard)
    assert rows.dtype == INDEX_DTYPE and np.array_equal(rows, good_rows)
    assert report.samples == 8 and report.bad_total == 0
    assert np.array_equal(load_index(shard)[0], good_rows)  # and the rebuilt index was saved
    with np.load(path) as saved:
        assert np.array_equal(saved["rows"], good_rows)
    assert ShardSet([shard]).read(0)[1] == "caption 0"


# ----------------------------------------------------------------------------- bad flags and paths

def shard_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(encode(smooth_image(32, 32, 0), "PNG"))
    (source / "a.txt").write_text("a caption")
    return source


@pytest.mark.parametrize("flags, named", [
    (["--shard-size", "1XB"], ["--shard-size '1XB'", "512MB"]),
    (["--shard-size", "0"], ["--shard-size '0'"]),
    (["--shard-size=-5MB"], ["--shard-size '-5MB'"]),
    (["--shard-size", "nan"], ["--shard-size 'nan'"]),
    (["--max-side", "-1"], ["--max-side -1", "0 to keep"]),
    (["--max-side", "big"], ["--max-side", "'big'"]),
    (["--workers", "0"], ["--workers 0", "at least 1"]),
    (["--prefix", "../x"], ["--prefix '../x'"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_a_bad_prepare_flag_is_one_line_before_anything_is_written(tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert prepare.main([str(shard_source(tmp_path)), str(out), "--quiet", *flags]) == 2
    line = one_error_line(capsys)
    assert all(part in line for part in named), line
    assert not out.exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_source, named", [
    (lambda tmp: tmp / "missing", ["missing does not exist"]),
    (lambda tmp: _write(tmp / "images.zip", "PK"), ["images.zip is a .zip file"]),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", ["is empty", "no images"]),
    (lambda tmp: _write(tmp / "rows.jsonl", ""), ["rows.jsonl is empty", "no rows"]),
    (lambda tmp: _write(tmp / "rows.jsonl", '{"image": "a.png", "caption": "x"}\nnot json\n'),
     ["rows.jsonl line 2 is not JSON"]),
    (lambda tmp: _write(tmp / "rows.jsonl", "[1, 2]\n"), ["rows.jsonl line 1 is a JSON list"]),
    (lambda tmp: _write(tmp / "rows.csv", "path,caption\na.png,x\n"), ["no column 'image'", "--image-column"]),
])
def test_a_bad_source_is_one_line(tmp_path, capsys, make_source, named):
    source = make_source(tmp_path)
    assert prepare.main([str(source), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert all(part in line for part in named), line
    out = tmp_path / "out"
    assert not out.exists() or not any(p.name.endswith((".tar", ".tar.tmp")) for p in out.iterdir())


def test_a_bad_out_dir_is_one_line(tmp_path, capsys):
    source = shard_source(tmp_path)
    afile = _write(tmp_path / "afile", "not a folder")
    assert prepare.main([str(source), str(afile), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"OUT_DIR {afile} is a file" in line, line
    assert prepare.main([str(source), str(afile / "below"), "--quiet"]) == 2
    assert "not writable" in one_error_line(capsys)
    assert afile.read_text() == "not a folder"


def test_a_source_where_nothing_is_usable_is_one_line(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(b"\x89PNG not really")
    (source / "a.txt").write_text("a caption")
    (source / "b.png").write_bytes(encode(smooth_image(32, 32, 0), "PNG"))  # no caption
    assert prepare.main([str(source), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "none of the 2 item(s)" in line and "1 corrupt image, 1 image without caption" in line


def test_shards_of_another_tool_in_out_dir_are_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    make_shards(out, shards=1, per_shard=2)
    (out / "part-000.tar").rename(out / "shard-000000.tar")
    before = (out / "shard-000000.tar").read_bytes()
    assert prepare.main([str(shard_source(tmp_path)), str(out), "--workers", "1", "--quiet"]) == 2
    assert "already holds 1 shard(s)" in one_error_line(capsys)
    assert (out / "shard-000000.tar").read_bytes() == before


# ----------------------------------------------------------------------------- bad shards in training

def test_training_on_missing_or_unreadable_shards_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.cli(SMALL + ["--data", str(tmp_path / "nowhere.tar"), "--run-dir", str(run)]) == 2
    assert "nowhere.tar does not exist" in one_error_line(capsys)
    garbage = _write(tmp_path / "garbage.tar", "this is not a tar file" * 100)
    assert train.cli(SMALL + ["--data", str(garbage), "--run-dir", str(run)]) == 2
    line = one_error_line(capsys)
    assert "hold no readable samples" in line and "not a tar file" in line
    with tarfile.open(tmp_path / "cut.tar", "w") as tar:  # every image's data cut off
        for n in range(4):
            data = encode(smooth_image(32, 32, n))
            info = tarfile.TarInfo(f"{n}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(cut.read_bytes()[:700])
    assert train.cli(SMALL + ["--data", str(cut), "--run-dir", str(run)]) == 2
    assert "hold no readable samples" in one_error_line(capsys)


# ----------------------------------------------------------------------------- a full disk

def test_prepare_on_a_full_disk_keeps_its_complete_shards_and_continues(small_disk, tmp_path, capsys):
    """Noise PNGs (incompressible, 196 KB each) into 1 MB shards on a 3.5 MiB disk: the fourth shard
    cannot fit. The complete ones stay, the partial one is removed, and the same command run
    where there is room (the folder copied there) makes exactly the shards of a run that never failed."""
    source = tmp_path / "noise"
    source.mkdir()
    rng = np.random.default_rng(0)
    for n in range(32):
        (source / f"{n:02d}.png").write_bytes(png(Image.fromarray(rng.integers(0, 256, (256, 256, 3), np.uint8))))
        (source / f"{n:02d}.txt").write_text(f"noise {n}")
    flags = ["--shard-size", "1MB", "--workers", "1", "--quiet"]
    out = small_disk / "out"
    assert prepare.main([str(source), str(out), *flags]) == 2
    line = one_error_line(capsys)
    assert f"no space left on {out}" in line and "complete shard(s) are kept" in line, line
    kept = sorted(out.glob("*.tar"))
    assert len(kept) >= 2 and not list(out.glob("*.tmp"))
    assert len(ShardSet(kept)) == json.loads((out / prepare.STATE_FILE).read_text())["samples"]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert prepare.main([str(source), str(moved), *flags]) == 0
    assert prepare.main([str(source), str(tmp_path / "straight"), *flags]) == 0
    straight = sorted((tmp_path / "straight").glob("*.tar"))
    assert [p.read_bytes() for p in sorted(moved.glob("*.tar"))] == [p.read_bytes() for p in straight]
