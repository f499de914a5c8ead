"""Synthetic anomalies: the properties each recipe promises, checked directly."""

import math

import cv2
import numpy as np
import pytest
import torch

from adnb.runtime.errors import AdnbError
from adnb.synthesis import (TextureSource, blend, cutpaste, draem_augment, large_cutpaste, perlin_anomalies,
                            perlin_mask, perlin_noise)
from adnb.synthesis.augment import drop_channels, dropout2d_keep, hue_rotate
from adnb.synthesis.cutpaste import rotate_about_origin
from adnb.synthesis.perlin import perlin_2d, rotate_each

DTD = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "dtd" / "images"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_perlin_noise_vanishes_on_the_lattice_and_is_bounded():
    noise = perlin_2d((64, 64), (4, 8), gen())
    assert torch.allclose(noise[::16, ::8], torch.zeros(4, 8), atol=1e-6)  # gradient noise is 0 at lattice points
    assert noise.abs().max() <= math.sqrt(2) * 1.0 + 1e-5
    assert noise.std() > 0.1


def test_perlin_handles_sizes_not_divisible_by_the_lattice():
    assert perlin_2d((100, 90), (32, 8), gen()).shape == (100, 90)


def test_perlin_scale_law_gives_powers_of_two_up_to_32():
    sizes = set()
    g = gen(1)
    for _ in range(200):
        sizes.add(2 ** int(torch.randint(0, 6, (), generator=g)))
    assert sizes == {1, 2, 4, 8, 16, 32}
    assert perlin_noise(3, 64, generator=gen()).shape == (3, 1, 64, 64)


def test_perlin_masks_are_binary_nonempty_repeatable_and_stay_within():
    masks = perlin_mask(16, 64, generator=gen(3))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).amax(1) == 1).all()
    assert torch.equal(masks, perlin_mask(16, 64, generator=gen(3)))
    within = torch.zeros(16, 1, 64, 64)
    within[..., 16:48, 16:48] = 1
    inside = perlin_mask(16, 64, generator=gen(4), within=within)
    assert (inside <= within).all() and (inside.flatten(1).amax(1) == 1).all()


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(1, 1, 33, 33)
    rotated = rotate_each(x, torch.tensor([90.0]))
    assert torch.allclose(rotated[0, 0, 1:-1, 1:-1], torch.rot90(x[0, 0], 1)[1:-1, 1:-1], atol=1e-4)


def test_blend_formula():
    images, textures = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:5, 2:5] = 1
    out = blend(images, textures, masks, 0.3)
    assert torch.equal(out[masks.expand_as(out) == 0], images[masks.expand_as(out) == 0])
    inside = masks.expand_as(out) == 1
    assert torch.allclose(out[inside], (0.3 * textures + 0.7 * images)[inside])
    assert torch.allclose(blend(images, textures, masks, 1.0)[inside], textures[inside])


def test_draem_augment_changes_textures_and_repeats_with_the_seed():
    x = torch.rand(4, 3, 32, 32)
    a, b = draem_augment(x, generator=gen(5)), draem_augment(x, generator=gen(5))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, x)


@pytest.mark.parametrize("kind", ["procedural", "images"])
def test_perlin_anomalies_change_exactly_the_masked_pixels(kind):
    x = torch.rand(4, 3, 64, 64)
    source = TextureSource.procedural(64) if kind == "procedural" else TextureSource.from_images(torch.rand(5, 3, 80, 80))
    out, masks = perlin_anomalies(x, source, generator=gen(6))
    outside = masks.expand_as(out) == 0
    assert torch.equal(out[outside], x[outside])
    assert (out - x).abs().flatten(1).amax(1).gt(0).all()
    assert out.min() >= 0 and out.max() <= 1


def test_texture_folder_errors_clearly(tmp_path):
    with pytest.raises(AdnbError, match="no texture images"):
        TextureSource.from_folder(tmp_path)


@pytest.mark.realdata
def test_texture_folder_reads_dtd():
    if not DTD.is_dir():
        pytest.skip("../shared/data/dtd is absent")
    source = TextureSource.from_folder(DTD, 64)
    assert len(source) == 480
    assert source.sample(2, generator=gen()).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("mode", ["normal", "scar"])
def test_cutpaste_only_touches_the_mask(mode):
    x = torch.rand(8, 3, 64, 64)
    out, masks = cutpaste(x, generator=gen(7), mode=mode)
    outside = masks.expand_as(out) == 0
    assert torch.equal(out[outside], x[outside])
    area = masks.flatten(1).mean(1)
    assert (area > 0).all()
    if mode == "normal":
        assert (area <= 0.16).all() and (area >= 0.015).all()
    else:
        assert (area < 0.2).all()


def test_large_cutpaste_is_one_big_rectangle():
    x = torch.rand(16, 3, 64, 64)
    out, masks = large_cutpaste(x, generator=gen(8))
    for m in masks[:, 0]:
        ys, xs = torch.nonzero(m, as_tuple=True)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert m.sum() == h * w and h <= 0.9 * 64 and w <= 0.9 * 64
    outside = masks.expand_as(out) == 0
    assert torch.equal(out[outside], x[outside])


def test_rotate_about_origin_matches_cv2_warp_affine():
    patch = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    a = -1.0  # whole radians, as FAIR draws them; -1 keeps most of the patch in frame
    m = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]], np.float32)
    ref = cv2.warpAffine(patch, m, (30, 40), flags=cv2.INTER_LINEAR, borderValue=0)
    ours = rotate_about_origin(torch.from_numpy(patch)[None], a)[0].numpy()
    both = (ref > 0) & (ours > 0)
    core = cv2.erode(both.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert core.sum() > 50
    assert np.abs(ref - ours)[core].max() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_synthesis_runs_on_gpu_with_the_same_result():
    x = torch.rand(2, 3, 64, 64)
    cpu = perlin_anomalies(x, TextureSource.procedural(64), generator=gen(9))
    gpu = perlin_anomalies(x.cuda(), TextureSource.procedural(64), generator=gen(9))
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-5)


# --- FAIR_noDTD's two extra augmenters

def test_hue_rotate_moves_primaries_by_hand():
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    green = torch.zeros(3, 2, 2)
    green[1] = 1.0
    yellow = torch.zeros(3, 2, 2)
    yellow[:2] = 1.0
    assert torch.allclose(hue_rotate(red, 120.0), green, atol=1e-5)
    assert torch.allclose(hue_rotate(red, 60.0), yellow, atol=1e-5)
    assert torch.allclose(hue_rotate(red, -240.0), green, atol=1e-5)  # modulo a full turn
    grey = torch.full((3, 2, 2), 0.4)
    assert torch.allclose(hue_rotate(grey, 77.0), grey, atol=1e-6)  # no hue to turn


def test_hue_rotate_matches_opencv_and_takes_one_angle_per_image():
    rgb = torch.rand(2, 3, 16, 16)
    angles = torch.tensor([33.0, 250.0])
    ours = hue_rotate(rgb, angles)
    for image, angle, out in zip(rgb, angles.tolist(), ours):
        hsv = cv2.cvtColor(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2HSV)  # float: H in degrees
        hsv[..., 0] = (hsv[..., 0] + angle) % 360
        ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() < 1e-4


def test_turning_bgr_read_as_rgb_forward_turns_the_true_hue_back():
    """Why ``_ops`` turns by −δ: the official loader adds δ to the hue of BGR arrays converted as RGB."""
    rgb = torch.rand(3, 8, 8)
    official = hue_rotate(rgb.flip(0), 70.0).flip(0)  # swap R and B, turn, swap back
    assert torch.allclose(official, hue_rotate(rgb, -70.0), atol=1e-5)
    assert not torch.allclose(official, hue_rotate(rgb, 70.0), atol=1e-2)


def test_dropout2d_zeroes_whole_channels_and_keeps_at_least_one():
    keep = dropout2d_keep(4000, 0.5, generator=gen(10))
    assert keep.any(dim=1).all()
    kept = keep.sum(dim=1).float()
    # each channel dropped with p = 0.5; all three dropped (1/8) becomes two: 1/8 keep 3, 3/8 keep 2, 1/2 keep 1
    for n, share in ((3, 1 / 8), (2, 3 / 8), (1, 1 / 2)):
        assert abs(float((kept == n).float().mean()) - share) < 0.03
    x = torch.rand(4000, 3, 4, 4) + 0.1
    out = drop_channels(x, keep)
    assert torch.equal(out[keep], x[keep]) and (out[~keep] == 0).all()


def test_nodtd_augmenters_join_the_draw_only_when_asked():
    x = torch.rand(64, 3, 16, 16) * 0.8 + 0.1  # no channel is zero by itself
    plain = draem_augment(x, generator=gen(11))
    assert torch.equal(plain, draem_augment(x, generator=gen(11), hue_and_dropout=False))
    nodtd = draem_augment(x, generator=gen(11), hue_and_dropout=True)
    assert torch.equal(nodtd, draem_augment(x, generator=gen(11), hue_and_dropout=True))
    zeroed = lambda y: (y.flatten(2).amax(2) == 0).any(1)  # a whole channel at zero: Dropout2d's mark
    assert not zeroed(plain).any()
    assert zeroed(nodtd).float().mean() > 0.05  # 3 of 12 picked: about a quarter of the draws include it
    assert not zeroed(TextureSource.from_images(x).sample(64, generator=gen(12))).any()
    assert zeroed(TextureSource.from_images(x, hue_and_dropout=True).sample(64, generator=gen(12))).any()


def test_fair_nodtd_uses_the_extra_augmenters():
    from adnb.methods import fair

    images = torch.rand(4, 3, 32, 32)
    assert fair.texture_source(fair.FairConfig(image_size=32), images).hue_and_dropout


def test_nodtd_hue_op_turns_the_true_hue_back_by_up_to_half_a_turn():
    from adnb.synthesis.augment import _ops

    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    for seed in range(20):
        ops = _ops(gen(seed), hue_and_dropout=True)
        assert len(ops) == 12
        hue = cv2.cvtColor(np.ascontiguousarray(ops[1](red).permute(1, 2, 0).numpy()), cv2.COLOR_RGB2HSV)[0, 0, 0]
        assert 180 - 1e-3 <= hue <= 360 or hue < 1e-3  # red (0°) turned by −U(0°, 180°)
