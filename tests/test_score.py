"""The practitioner's scoring path: unreadable files, resize modes, streaming `adnb score`, resuming."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from adnb import cli, inference
from adnb.calibration import calibrate, load_calibration, save_calibration
from adnb.data.framing import frame_image, frame_mask, plan, stitch, tile_offsets
from adnb.data.images import ImageReadError, read_image
from adnb.data.layout import load_category
from adnb.inference import Scored, Scorer, Skipped
from adnb.methods import baseline
from adnb.runtime.cache import CacheEntry
from adnb.runtime.errors import AdnbError


# ---------------------------------------------------------------- unreadable files

def broken_files(folder):
    """The three kinds of bad file of the issue: a truncated PNG, a text file renamed .png, an empty .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    (folder / "truncated.png").write_bytes(data.tobytes()[: len(data) // 2])
    (folder / "notes.png").write_text("meeting notes: ship on Friday\n")
    (folder / "empty.jpg").write_bytes(b"")
    return ["truncated.png", "notes.png", "empty.jpg"]


def test_unreadable_files_raise_a_clear_error_naming_file_and_reason(tmp_path):
    broken_files(tmp_path)
    ok, jpg = cv2.imencode(".jpg", np.zeros((30, 30, 3), np.uint8))
    (tmp_path / "truncated.jpg").write_bytes(jpg.tobytes()[:200])
    expected = {"truncated.png": "damaged or truncated PNG", "notes.png": "holds text: 'meeting notes",
                "empty.jpg": "empty (0 bytes)", "truncated.jpg": "damaged or truncated JPEG"}
    for name, reason in expected.items():
        with pytest.raises(ImageReadError) as caught:
            read_image(tmp_path / name)
        assert reason in caught.value.reason and caught.value.path == tmp_path / name
        assert str(tmp_path / name) in str(caught.value) and "replace or remove" in str(caught.value)
        assert isinstance(caught.value, AdnbError)


def test_a_png_named_jpg_still_reads(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (10, 12, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "real.png"), image)
    (tmp_path / "real.png").rename(tmp_path / "misnamed.jpg")
    assert np.array_equal(read_image(tmp_path / "misnamed.jpg"), image[:, :, ::-1])


# ---------------------------------------------------------------- resize modes

def test_plans_for_a_strip():
    assert plan(500, 1250, 100, "squash").windows == ((0, 0),)
    box = plan(500, 1250, 100, "letterbox")
    assert box.work == (40, 100) and box.windows == ((-30, 0),)  # 40 rows of content centred in 100
    tiles = plan(500, 1250, 100, "tile")
    assert tiles.work == (100, 250) and tiles.windows == ((0, 0), (0, 75), (0, 150))  # ⌈150/75⌉ + 1 tiles
    tall = plan(1250, 500, 100, "tile")
    assert tall.work == (250, 100) and [w[0] for w in tall.windows] == [0, 75, 150]
    assert plan(300, 300, 100, "tile").windows == ((0, 0),)  # a square image: one tile, as squash
    with pytest.raises(AdnbError, match="unknown resize mode 'crop'"):
        plan(10, 10, 4, "crop")


def test_tile_offsets_cover_with_the_overlap():
    for length, size in [(250, 100), (1000, 64), (101, 100), (640, 256)]:
        offsets = tile_offsets(length, size, 0.25)
        assert offsets[0] == 0 and offsets[-1] == length - size
        assert all(0 < b - a <= size * 0.75 for a, b in zip(offsets, offsets[1:]))


def test_stitching_averages_the_overlaps():
    framing = plan(100, 250, 100, "tile")  # work = image size: no resampling, tiles at 0, 75, 150
    maps = torch.stack([torch.full((100, 100), float(v)) for v in (0, 3, 6)])
    out = stitch(maps, framing).numpy()
    assert out.shape == (100, 250)
    assert out[0, 10] == 0 and out[0, 80] == 1.5 and out[0, 160] == 4.5 and out[0, 240] == 6


@pytest.mark.parametrize("mode", ["squash", "letterbox", "tile"])
def test_frame_then_stitch_gives_the_image_back(mode):
    # A smooth image "scored" by its own brightness must come back as itself at full resolution.
    yy, xx = np.mgrid[0:120, 0:300]
    image = (100 + 50 * np.sin(xx / 40) * np.cos(yy / 30)).astype(np.uint8)[:, :, None].repeat(3, 2)
    tiles, framing = frame_image(image, 48, mode)
    back = stitch(torch.from_numpy(tiles[..., 0]).float(), framing).numpy()
    assert back.shape == (120, 300)
    assert np.abs(back - image[..., 0]).mean() < 1.5


def test_masks_are_framed_like_their_images():
    mask = np.zeros((100, 250), bool)
    mask[:, 160:170] = True
    tiles = frame_mask(mask, plan(100, 250, 100, "tile"))
    assert tiles.shape == (3, 100, 100)
    assert not tiles[0].any() and tiles[1][:, 85:95].all() and tiles[2][:, 10:20].all()
    boxed = frame_mask(np.ones((50, 100), bool), plan(50, 100, 20, "letterbox"))[0]
    assert boxed[5:15].all() and not boxed[:5].any() and not boxed[15:].any()  # padding is normal


def strip(rng, defect=False):
    """A 500×1250 strip: per-strip brightness and fine noise; the defect a 3-px scratch across it."""
    image = 120 + rng.normal(0, 4) + rng.normal(0, 4, (500, 1250, 1))
    if defect:
        image[50:450, 700:703] += 50
    return np.repeat(image, 3, 2).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def strips(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("strips") / "belt"
    (root / "train" / "good").mkdir(parents=True)
    for i in range(12):
        cv2.imwrite(str(root / "train" / "good" / f"{i:02d}.png"), strip(rng))
    return root, [strip(rng) for _ in range(4)], strip(rng, defect=True)


def test_tiles_keep_a_thin_scratch_that_squash_thins_out(strips):
    root, normal, scratched = strips
    category = load_category(root)
    ratios = {}
    for mode in ("squash", "tile"):
        split = category.load("train", 64, resize=mode)
        assert len(split) == 12 * (3 if mode == "tile" else 1)  # every tile of every strip trains
        assert split.n_images == len(split.image_samples) == 12
        assert split.per_image(torch.arange(len(split)).float()).tolist() == (
            [3.0 * i + 2 for i in range(12)] if mode == "tile" else list(range(12)))
        detector = baseline.fit(baseline.BaselineConfig(image_size=64, box=3), split.float_images())
        scorer = Scorer(detector, resize=mode)
        normal_peak = max(r.map.max() for r in scorer.batch(normal))
        result = scorer(scratched)
        assert result.map.shape == (500, 1250)
        ratios[mode] = result.map[50:450, 695:708].max() / normal_peak  # the scratch vs the hottest normal pixel
    # tiles shrink the strip 7.8× across the scratch, squash 19.5×: the scratch outshines every good pixel
    # with tiles, and keeps far less of its contrast squashed (0.89 against 1.68 for this seed)
    assert ratios["tile"] > 1.3 and ratios["tile"] > 1.5 * ratios["squash"], ratios


def test_category_load_keeps_its_old_signature(strips):
    root, _, _ = strips
    split = load_category(root).load("train", 16, 4, 0)
    assert split.images.shape == (4, 3, 16, 16) and split.resize == "squash"
    assert split.origin.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- streaming score command

SIZE = 16


def normal_image(rng, h=48, w=64):
    return rng.normal(128, 6, (h, w, 3)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A calibrated and an uncalibrated baseline checkpoint, trained here in milliseconds."""
    root = tmp_path_factory.mktemp("checkpoints")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([normal_image(rng, SIZE, SIZE) for _ in range(30)])).permute(0, 3, 1, 2)
    paths = {}
    for name in ("calibrated", "plain"):
        config = baseline.BaselineConfig(image_size=SIZE, box=3)
        cache = CacheEntry(root / name, {"method": "baseline", "config": config})
        detector = baseline.fit(config, images[:22].float() / 255, cache=cache)
        if name == "calibrated":
            save_calibration(cache.weights_path, calibrate(detector, images[22:]))
        paths[name] = str(cache.weights_path)
    return paths


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        picture = normal_image(rng)
        if i in (3, 7):
            picture[10:30, 20:40] = 255  # two clearly anomalous images
        cv2.imwrite(str(images / f"part_{i:02d}.png"), picture[:, :, ::-1])
    (images / "readme.txt").write_text("not an image, and not picked up by its suffix")
    return images


def rows_of(out):
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def test_the_csv_and_help_state_the_default_thresholds_false_alarm_bound(checkpoints, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--out", str(out)]) == 0
    first = (out / "scores.csv").read_text().splitlines()[0]
    # 8 held-out normal images: the largest of their scores, exceeded by a new normal one with P ≤ 1/9
    assert first.startswith("# threshold ") and "the largest of 8 held-out normal scores" in first
    assert "at most 1/9 = 11.1%" in first and first[2:] in capsys.readouterr().err
    import pandas as pd

    assert len(pd.read_csv(out / "scores.csv", comment="#")) == 10
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from adnb.calibration import CONFORMAL_ALPHA, false_alarm_bound
    from adnb.recipe import DEFAULT_HOLDOUT, MAX_HOLDOUT

    for n in (10, MAX_HOLDOUT):  # the help's examples are the rule's values at the default hold-out
        assert f"1/{n + 1} = {false_alarm_bound(n, CONFORMAL_ALPHA)[1]:.1%}".replace("%", " %") in text
    assert f"({DEFAULT_HOLDOUT:.0%} of train/good, 2 to {MAX_HOLDOUT} images".replace("%", " %") in text
    assert "--threshold f1-test" in text and "optimistic" in text


def test_the_test_set_threshold_only_on_request(checkpoints, folder, tmp_path, capsys):
    # this checkpoint's calibration had no labelled test set: there is no F1 threshold to give
    assert cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--out", str(tmp_path / "o"),
                     "--threshold", "f1-test"]) == 2
    assert "no test-set F1 threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--threshold", "f1"])
    assert "neither a number nor f1-test" in capsys.readouterr().err


def test_score_writes_calibrated_rows_and_names_every_skipped_file(checkpoints, folder, tmp_path, capsys):
    bad = broken_files(folder)
    out = tmp_path / "out"
    status = cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--out", str(out),
                       "--batch-size", "4"])
    assert status == cli.EXIT_SKIPPED == 3
    err = capsys.readouterr().err
    for name in bad:
        assert err.count(f"skipped {folder / name}: ") == 1  # one line as it happens…
        assert f"  {folder / name}: " in err.split("not readable images")[1]  # …and again in the summary
    rows = rows_of(out)
    assert len(rows) == 10 and list(rows[0]) == ["image", "score", "normalised", "anomalous", "overlay"]
    threshold = load_calibration(checkpoints["calibrated"]).threshold
    for row in rows:
        anomalous = float(row["score"]) >= threshold
        assert row["anomalous"] == str(int(anomalous)) and (float(row["normalised"]) >= 0.5) == anomalous
        assert cv2.imread(str(out / row["overlay"])).shape == (48, 64, 3)
    flagged = {r["image"].rsplit("/", 1)[1] for r in rows if r["anomalous"] == "1"}
    assert flagged == {"part_03.png", "part_07.png"}


def test_score_exits_0_when_everything_was_scored(checkpoints, folder, tmp_path, capsys):
    assert cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--out", str(tmp_path / "o")]) == 0
    assert "skipped" not in capsys.readouterr().err


def test_an_interrupted_run_resumes_where_it_stopped(checkpoints, folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real, calls = Scorer._score, []

    def interrupt_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "_score", interrupt_second_batch)
    args = ["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--out", str(out), "--batch-size", "4"]
    assert cli.main(args) == 130
    assert len(rows_of(out)) == 4 and "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.setattr(Scorer, "_score", real)
    with open(out / "scores.csv", "a") as fh:
        fh.write("/half/a/row")  # as if killed in the middle of a write
    assert cli.main(args) == 0
    assert "scored 6 image(s)" in capsys.readouterr().err
    images = [r["image"] for r in rows_of(out)]
    assert len(images) == len(set(images)) == 10
    assert cli.main(args + ["--overwrite"]) == 0
    assert "scored 10 image(s)" in capsys.readouterr().err and len(rows_of(out)) == 10


def test_resuming_with_other_settings_is_refused(checkpoints, folder, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["score", str(folder), "--out", str(out)]
    assert cli.main(base + ["--checkpoint", checkpoints["calibrated"]]) == 0
    assert cli.main(base + ["--checkpoint", checkpoints["calibrated"], "--threshold", "9"]) == 2
    assert "was written by another run (threshold was" in capsys.readouterr().err
    assert cli.main(base + ["--checkpoint", checkpoints["plain"]]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_uncalibrated_checkpoint_gives_raw_scores_and_says_so_once(checkpoints, folder, tmp_path, capsys):
    out = tmp_path / "raw"
    assert cli.main(["score", "--checkpoint", checkpoints["plain"], str(folder), "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("has no calibration") == 1
    assert list(rows_of(out)[0]) == ["image", "score", "overlay"]
    out = tmp_path / "thresholded"
    assert cli.main(["score", "--checkpoint", checkpoints["plain"], str(folder), "--out", str(out),
                     "--threshold", "1e9", "--no-overlays"]) == 0
    rows = rows_of(out)
    assert list(rows[0]) == ["image", "score", "anomalous"] and {r["anomalous"] for r in rows} == {"0"}
    assert not list(out.glob("*.png"))


def test_overlays_of_two_runs_share_one_colour_scale(checkpoints, folder, tmp_path):
    # With a per-run scale the same image would be painted differently next to a hotter one.
    alone, mixed = tmp_path / "alone", tmp_path / "mixed"
    cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder / "part_00.png"), "--out", str(alone)])
    cli.main(["score", "--checkpoint", checkpoints["calibrated"], str(folder), "--out", str(mixed)])
    assert np.array_equal(cv2.imread(str(alone / "part_00_overlay.png")), cv2.imread(str(mixed / "part_00_overlay.png")))

    def hot(name):  # pixels painted in the red end of the colour map (BGR: red well above green and blue)
        bgr = cv2.imread(str(mixed / name)).astype(int)
        return int((bgr[..., 2] - np.maximum(bgr[..., 0], bgr[..., 1]) > 80).sum())

    # on the calibration's scale a normal image stays out of the red (a scale of its own would paint its peak red)
    assert hot("part_00_overlay.png") == 0 and hot("part_03_overlay.png") > 20


def test_score_paths_streams(checkpoints, folder, monkeypatch):
    # Only the batch being scored and the one being read ahead may have been decoded.
    reads = []
    real = inference._read
    monkeypatch.setattr(inference, "_read", lambda p: (reads.append(p), real(p))[1])
    scorer = Scorer.from_checkpoint(checkpoints["calibrated"], "cpu")
    paths = sorted(folder.glob("*.png")) * 3
    stream = scorer.score_paths(paths, batch_size=2)
    first = next(stream)
    assert isinstance(first, Scored) and first.image is None and first.anomalous is not None
    assert len(reads) <= 4
    assert sum(1 for _ in stream) == len(paths) - 1
    stream = scorer.score_paths([folder / "readme.txt", paths[0]], batch_size=2)
    assert [type(item) for item in stream] == [Skipped, Scored]


def test_scorer_resize_default_comes_from_the_checkpoint(checkpoints, tmp_path):
    sidecar = tmp_path / "weights.json"
    pt = tmp_path / "weights.pt"
    data = json.loads(open(checkpoints["plain"].replace(".pt", ".json")).read())
    sidecar.write_text(json.dumps({**data, "resize": "tile"}))
    pt.write_bytes(open(checkpoints["plain"], "rb").read())
    assert inference.checkpoint_resize(pt) == "tile" and Scorer.from_checkpoint(pt, "cpu").resize == "tile"
    assert Scorer.from_checkpoint(pt, "cpu", resize="letterbox").resize == "letterbox"
    assert inference.checkpoint_resize(checkpoints["plain"]) == "squash"
    wide = np.random.default_rng(0).integers(0, 255, (20, 90, 3), np.uint8)
    result = Scorer.from_checkpoint(pt, "cpu")(wide)
    assert result.map.shape == (20, 90) and np.isfinite(result.score)


def test_a_missing_input_is_a_usage_error(checkpoints, tmp_path, capsys):
    assert cli.main(["score", "--checkpoint", checkpoints["plain"], str(tmp_path / "nope.png")]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
