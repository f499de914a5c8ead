"""train-all on a multi-node Ray cluster, simulated on this machine (``ray.cluster_utils.Cluster``): a driver
and a worker node that disagree about bf16 train and load one model under one cache key; a worker killed
mid-job is retried from its checkpoint while the other jobs finish; a node with another adnb is refused.

The head node takes no jobs (0 CPUs); the worker node has 1 CPU, native bf16 as far as adnb can tell
(``ADNB_CPU_BF16=1`` in its environment, where this process has ``0``), the test suite's third-party
method on its path, and an order to kill the first ``tiny`` job it runs at the start of its second epoch.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from adnb import __version__
from adnb.data import default_dataset
from adnb.methods import registry
from adnb.recipe import Recipe
from adnb.runtime import paths
from adnb.runtime.errors import AdnbError
from adnb.runtime.notebook import open_categories
from adnb.schedule import train_all
from third_party_site import install

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def new_home(folder: Path, dataset: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / dataset.name).symlink_to(dataset)
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SimpleNamespace]:
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is not installed: pip install -e .[ray]")
        pytest.skip("Ray is an optional extra: pip install -e .[ray]")
    from ray.cluster_utils import Cluster

    sys.modules.pop("tiny_method", None)  # imported afresh: its declaration goes into this module's registry
    root = tmp_path_factory.mktemp("cluster")
    site = install(root / "site")
    dataset = default_dataset()  # the suite's shared copy (ADNB_DATA, see conftest)
    killed = root / "killed"
    worker_env = {"ADNB_CPU_BF16": "1", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
                  "TINY_KILL_AT_EPOCH": "1", "TINY_KILL_MARKER": str(killed)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("ADNB_CPU_BF16", "0")  # this machine, the driver, resolves precision auto to fp32
        mp.syspath_prepend(str(site))
        mp.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
        # Ray puts the driver's working folder on its workers' path: not the checkout, so that a node's own
        # adnb (the version test's) is the one it imports
        mp.chdir(root)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": {"ADNB_CPU_BF16": "0"}})
        cluster.add_node(num_cpus=1, env_vars=worker_env)
        cluster.wait_for_nodes()
        try:
            yield SimpleNamespace(cluster=cluster, root=root, dataset=dataset, killed=killed,
                                  driver=new_home(root / "driver", dataset), worker=new_home(root / "worker", dataset))
        finally:
            cluster.shutdown()
            sys.modules.pop("tiny_method", None)


@contextmanager
def driver_home(cluster: SimpleNamespace) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADNB_HOME", str(cluster.driver))
        yield cluster.driver


def on_cluster(cluster: SimpleNamespace, methods: list[str], **kwargs) -> tuple:
    out = io.StringIO()
    report = train_all(methods, "ci", executor="ray", address=cluster.cluster.address, worker_home=str(cluster.worker),
                       out=out, **kwargs)
    print(out.getvalue())  # the test's output shows what train-all said
    return report, out.getvalue()


def test_a_mixed_cluster_trains_each_model_once_under_one_key(cluster):
    """FAIR with ``precision: auto`` trains at bf16 on the worker node; the driver, which would run fp32, plans
    the same cache entry, so a second call trains nothing and this machine's book loads the model."""
    job = {"categories": ["capsule"], "overrides": {"fair.precision": "auto"}}
    with driver_home(cluster):
        report, _ = on_cluster(cluster, ["fair"], **job)
        assert not report.failed, report.failed
        [record] = [json.loads(p.read_text()) for p in report.records]
        assert record["train_precision"] == "bf16" and record["precision"] == "bf16"  # trained and scored there

        again, said = on_cluster(cluster, ["fair"], **job)
        assert not again.trained and len(again.skipped) == 1 and "nothing to do" in said

        weights = {p: p.stat().st_mtime_ns for p in paths.cache_dir().rglob("weights.pt")}
        recipe = Recipe.from_preset("fair", "ci", {"precision": "auto"}, device="cpu")  # what the chapter runs
        [capsule] = open_categories("", "capsule")
        assert recipe.is_trained(capsule)
        here = recipe.run(capsule)
        assert str(here.detector.checkpoint) == record["checkpoint"]
        assert (here.detector.train_precision, here.detector.precision) == ("bf16", "fp32")
        book = json.loads(here.record.read_text())
        assert (book["train_precision"], book["precision"], book["config_hash"]) == ("bf16", "fp32", record["config_hash"])
        assert {p: p.stat().st_mtime_ns for p in paths.cache_dir().rglob("weights.pt")} == weights, "retrained"


def test_a_worker_killed_mid_job_is_retried_from_its_checkpoint(cluster):
    """The worker running ``tiny`` is SIGKILLed at the start of epoch 2 of 3: Ray retries the task, which resumes
    from the checkpoint epoch 1 left; baseline finishes too, and a second call has nothing to do."""
    jobs = {"categories": ["washer"], "overrides": {"tiny.epochs": 3}}
    with driver_home(cluster) as home:
        report, said = on_cluster(cluster, ["tiny", "baseline"], **jobs)
        assert cluster.killed.is_file(), "no worker was killed: the test tested nothing"
        assert not report.failed, report.failed
        assert sorted(p.job.method for p in report.trained) == ["baseline", "tiny"]
        log = (home / "logs/train-all/ci/tiny-embedded-washer.log").read_text()
        assert "resuming from the checkpoint after epoch 1/3" in log, log
        [tiny] = [json.loads(p.read_text()) for p in report.records if "tiny" in p.name]
        assert len(json.loads((Path(tiny["checkpoint"]).with_suffix(".json")).read_text())["info"]["history"]) == 3

        again, _ = on_cluster(cluster, ["tiny", "baseline"], **jobs)
        assert not again.trained and len(again.skipped) == 2


def test_a_node_with_another_adnb_is_refused(cluster, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(REPO / "adnb", other / "adnb", ignore=shutil.ignore_patterns("__pycache__"))
    init = other / "adnb" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', '__version__ = "0.0.0-other"'))
    assert "0.0.0-other" in init.read_text()
    node = cluster.cluster.add_node(num_cpus=1, env_vars={"PYTHONPATH": str(other), "HF_HUB_OFFLINE": "1"})
    cluster.cluster.wait_for_nodes()
    try:
        with driver_home(cluster), pytest.raises(AdnbError) as refused:
            on_cluster(cluster, ["baseline"], categories=["stone"])
        print(f"error: {refused.value}")
        assert f"runs adnb 0.0.0-other, this machine adnb {__version__}" in str(refused.value)
        assert "Install the same adnb on every node" in str(refused.value)
    finally:
        cluster.cluster.remove_node(node)
