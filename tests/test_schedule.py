"""train-all: planning skips what the cache holds, shared preparation runs once and first, weights travel
from workers without a shared file system, and the book's recipes (and a chapter) then load them."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adnb import schedule
from adnb.data import default_dataset
from adnb.recipe import Recipe
from adnb.runtime import paths
from adnb.runtime.errors import AdnbError
from adnb.runtime.notebook import open_categories
from adnb.schedule import Job, Outcome, Planned, Task
from adnb.schedule.worker import captured

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["capsule", "stone"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The embedded dataset the suite shares (``ADNB_DATA``, see conftest); every home below links to it."""
    return default_dataset()


def new_home(folder: Path, dataset: Path) -> Path:
    """An empty ADNB_HOME whose embedded dataset is ``dataset`` (a worker that has the data)."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / dataset.name).symlink_to(dataset)
    return folder


@contextmanager
def home_set(home: Path) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADNB_HOME", str(home))
        yield home


@pytest.fixture
def home(tmp_path, dataset, monkeypatch) -> Path:
    monkeypatch.setenv("ADNB_HOME", str(new_home(tmp_path / "driver", dataset)))
    return tmp_path / "driver"


def weights_mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (root / "weights").rglob("weights.pt")}


def assert_book_loads(report: schedule.Report) -> None:
    """What the chapters do (a ``Recipe`` of the chapter's parameters at the preset) finds every trained
    model in the cache, loads it and reports the training time train-all measured; nothing is saved."""
    before = weights_mtimes(paths.home())
    records = {(r["method"], r.get("variant", ""), r["category"]): r
               for r in map(json.loads, (p.read_text() for p in report.records))}
    for p in report.trained:
        recipe = Recipe.from_preset(p.job.method, p.job.preset, device="cpu")
        recipe = recipe.variants()[p.job.variant] if p.job.variant else recipe
        [category] = open_categories("", p.job.category)
        assert recipe.is_trained(category), p.job.name
        trained = recipe.train(category)
        record = records[p.job.method, p.job.variant, p.job.category]
        assert trained.detector.train_seconds == pytest.approx(record["train_seconds"]), p.job.name
        assert Path(record["checkpoint"]) == trained.detector.checkpoint
        assert str(trained.detector.checkpoint).startswith(str(paths.cache_dir()))
    assert weights_mtimes(paths.home()) == before, "loading must not retrain"


# --- planning


def test_unknown_method_or_preset_fails_clearly(home):
    with pytest.raises(AdnbError, match="unknown method.*nope.*valid: baseline"):
        schedule.plan(["nope"], "ci")
    with pytest.raises(AdnbError, match="unknown preset 'huge'; valid presets: ci, cpu, full"):
        schedule.plan(["fair"], "huge")
    with pytest.raises(AdnbError, match="no category marble .*categories: capsule"):
        schedule.plan(["fair"], "ci", categories=["marble"])
    with pytest.raises(AdnbError, match="unknown executor"):
        schedule.train_all(["fair"], "ci", executor="slurm")


def test_overrides_apply_to_every_method_or_to_one():
    overrides = {"realnet.epochs": 1, "epochs": 3, "fair.width": 8}
    assert schedule.overrides_for("fair", overrides) == {"epochs": 3, "width": 8}
    assert schedule.overrides_for("realnet", overrides) == {"epochs": 1}  # the scoped value wins
    with pytest.raises(AdnbError, match="'farm' is not a method"):
        schedule.overrides_for("fair", {"farm.width": 8})


def test_plan_skips_jobs_whose_weights_are_cached(home):
    planned = schedule.plan(["baseline"], "ci", categories=CATEGORIES)
    assert [(p.job.category, p.trained) for p in planned] == [("capsule", False), ("stone", False)]
    recipe = Recipe.from_preset("baseline", "ci", device="cpu")
    [capsule] = open_categories("", "capsule")
    trained = recipe.train(capsule)
    again = schedule.plan(["baseline"], "ci", categories=CATEGORIES)
    assert [(p.job.category, p.trained) for p in again] == [("capsule", True), ("stone", False)]
    assert again[0].entry == schedule.relative(trained.detector.checkpoint.parent)


def test_a_chapters_named_variant_is_a_job_of_its_own(home):
    """PyramidFlow's chapter trains a pre-trained variant beside the from-scratch model: train-all plans
    both, into the entries the chapter's recipes use."""
    planned = schedule.plan(["pyramidflow"], "ci", categories=["capsule"])
    assert [p.job.name for p in planned] == ["pyramidflow on embedded/capsule",
                                             "pyramidflow-pretrained on embedded/capsule"]
    chapter = Recipe.from_preset("pyramidflow", "ci", device="cpu")
    in_chapter = chapter.with_params(**chapter.params["pretrained_variant"])  # what chapter 03 trains
    [capsule] = open_categories("", "capsule")
    assert planned[1].entry == schedule.relative(in_chapter.cache_entry(capsule).folder) != planned[0].entry
    assert planned[1].job.recipe(device="cpu").params == in_chapter.params


def test_planning_never_trains_a_shared_preparation(home):
    """RealNet's SDAS model serves the whole dataset: asked to plan only, its ``prepare`` names the missing
    entry (and the key the models will have) without training it, and every RealNet job of the dataset waits
    on that same entry."""
    planned = schedule.plan(["realnet"], "ci", categories=CATEGORIES)
    shares = {p.shares for p in planned}
    assert len(shares) == 1 and "sdas" in shares.pop()
    assert not any(p.trained for p in planned) and all(p.entry.startswith("realnet/model-") for p in planned)
    assert not list((home / "weights").rglob("weights.*")), "planning made something"


def test_planning_patches_nothing():
    """Planning asks the methods to plan (``prepare(plan=True)``): no class of the package is patched to stop a
    training, and no environment is swapped wholesale."""
    for path in (REPO / "adnb" / "schedule").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*[A-Z]\w*\.\w+ = ", source, re.M), f"{path.name} assigns to a class attribute"
        assert "os.environ.clear" not in source, path.name


def test_no_ray_import_outside_its_executor():
    for path in (REPO / "adnb" / "schedule").glob("*.py"):  # Ray is imported inside RayExecutor only
        assert not re.search(r"^(import ray|from ray)", path.read_text(), re.M), path.name
    code = ("import sys; import adnb.cli, adnb.schedule; from adnb.cli import build_parser; "
            "build_parser().parse_args(['train-all', '--preset', 'ci']); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(AdnbError, match=re.escape("needs Ray, an optional extra: pip install -e .[ray]")):
        schedule.make_executor("ray")


# --- moving cache entries


def test_entries_travel_whole_and_sidecar_last(tmp_path):
    files = {"fair/model-1/weights.json": b"{}", "fair/model-1/weights.pt": b"w" * 10}
    written = schedule.write_entries(files, tmp_path)
    assert [p.name for p in written] == ["weights.pt", "weights.json"]  # the entry "exists" only when complete
    assert schedule.write_entries(files, tmp_path) == []  # identical files are left alone
    (tmp_path / "fair/model-1/checkpoint.pt").write_bytes(b"resume")
    assert schedule.read_entries(["fair/model-1"], tmp_path) == files  # the resume file stays with its worker
    with pytest.raises(AdnbError, match="outside the cache"):
        schedule.write_entries({"../evil/weights.pt": b"x"}, tmp_path)


class InlineExecutor:
    """Runs each task when the scheduler asks for the next result, in order: shows what was sent when."""

    jobs, threads, device, ships = 1, 1, "cpu", True

    def __init__(self, run: Callable[[Task, dict | None], Outcome]):
        self.run, self.queue, self.sent = run, [], []

    def submit(self, task, needs):
        self.queue.append((task, needs))

    def next_done(self):
        task, needs = self.queue.pop(0)
        self.sent.append((task.job.category, sorted(needs or {})))
        return task, self.run(task, needs)

    def in_flight(self):
        return len(self.queue)

    def describe(self):
        return "inline"

    def close(self):
        pass


def shared_plan() -> list[Planned]:
    """RealNet on a, c and d shares one missing SDAS entry; FAIR on b needs nothing."""
    sdas = "realnet/sdas-1"
    return [Planned(Job("fair", "ci", "b"), entry="fair/model-b"), Planned(Job("realnet", "ci", "a"), shares=sdas),
            Planned(Job("realnet", "ci", "c"), shares=sdas), Planned(Job("realnet", "ci", "d"), shares=sdas)]


def test_a_shared_preparation_runs_first_and_travels_to_the_jobs_that_wait(home):
    made = {"realnet/sdas-1/weights.pt": b"sdas", "realnet/sdas-1/weights.json": b"{}"}

    def run(task, needs):
        first = task.job.category == "a"
        return Outcome(True, prepared=["realnet/sdas-1"] if task.job.method != "fair" else [],
                       files=made if first else {})

    executor = InlineExecutor(run)
    report = schedule.run_jobs(shared_plan(), executor, out=io.StringIO())
    assert [c for c, _ in executor.sent] == ["a", "b", "c", "d"]  # the job others wait for goes first
    assert executor.sent[0][1] == [] and executor.sent[2][1] == executor.sent[3][1] == sorted(made)  # a's SDAS
    assert len(report.trained) == 4 and not report.failed
    assert (home / "weights/realnet/sdas-1/weights.pt").read_bytes() == b"sdas"


def test_jobs_waiting_on_a_failed_preparation_are_reported_not_run(home):
    def run(task, needs):
        return Outcome(False, error="RuntimeError: boom", log="line 1\nline 2") if task.job.category == "a" \
            else Outcome(True)

    out = io.StringIO()
    executor = InlineExecutor(run)
    report = schedule.run_jobs(shared_plan(), executor, out=out)
    assert [c for c, _ in executor.sent] == ["a", "b"]
    assert [p.job.category for p, _ in report.failed] == ["a", "c", "d"]
    text = out.getvalue()
    assert "FAILED realnet on embedded/a after 0 s: RuntimeError: boom\n    | line 1\n    | line 2" in text
    assert "FAILED realnet on embedded/c not run: the preparation it shares (realnet/sdas-1) failed" in text
    assert (home / "logs/train-all/ci/realnet-embedded-a.log").read_text() == "line 1\nline 2"


# --- the executors, for real, at the ci preset


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, dataset) -> tuple[Path, Path, schedule.Report]:
    """baseline and RealNet on two categories, 2 processes, workers in their own ADNB_HOME."""
    root = tmp_path_factory.mktemp("local")
    driver, worker = new_home(root / "driver", dataset), new_home(root / "worker", dataset)
    with home_set(driver):
        report = schedule.train_all(["baseline", "realnet"], "ci", categories=CATEGORIES, executor="local", jobs=2,
                                    worker_home=str(worker), out=io.StringIO())
    return driver, worker, report


def test_local_executor_trains_every_job_and_brings_the_weights_home(local_run):
    driver, worker, report = local_run
    assert not report.failed, report.failed
    assert sorted((p.job.method, p.job.category) for p in report.trained) == [
        ("baseline", "capsule"), ("baseline", "stone"), ("realnet", "capsule"), ("realnet", "stone")]
    for store in (driver, worker):  # RealNet's dataset-wide SDAS model and samples, trained once, came home too
        assert {p.parent.name.split("-")[0] for p in (store / "weights/realnet").rglob("weights.json")} == {"model",
                                                                                                          "sdas"}
    with home_set(driver):
        assert_book_loads(report)
        again = schedule.train_all(["baseline", "realnet"], "ci", categories=CATEGORIES, out=io.StringIO())
    assert not again.trained and len(again.skipped) == 4


def test_a_worker_given_the_preparation_does_not_make_it_again(local_run, tmp_path, dataset):
    """A third RealNet job in a worker with an empty cache of its own: the SDAS files the driver ships are
    used as they are, and only the job's own model comes back."""
    driver, _, _ = local_run
    with home_set(driver):
        [planned] = schedule.plan(["realnet"], "ci", categories=["washer"])
        needs = schedule.read_entries(planned.needs)
    assert planned.needs and not planned.trained and all("sdas" in n for n in planned.needs)
    fresh = new_home(tmp_path / "fresh", dataset)
    outcome = schedule.run_job(Task(0, planned.job, "cpu", 1, str(fresh)), needs)
    assert outcome.ok, outcome.log
    assert outcome.entry == planned.entry and not outcome.loaded
    assert sorted({name.rpartition("/")[0] for name in outcome.files}) == [planned.entry]
    for name, content in needs.items():
        assert (fresh / "weights" / name).read_bytes() == content, f"{name} was made again"


def test_a_failing_job_is_reported_with_its_log_tail_and_the_others_finish(home):
    out = io.StringIO()
    report = schedule.train_all(["baseline", "fair"], "ci", categories=["capsule"], overrides={"fair.batch_size": 0},
                                out=out)
    assert [p.job.method for p in report.trained] == ["baseline"]
    [(failed, why)] = report.failed
    assert failed.job.method == "fair" and "Traceback" in why and "full log:" in why
    log = home / "logs/train-all/ci/fair-embedded-capsule.log"
    assert "Traceback (most recent call last)" in log.read_text()
    assert "FAILED fair on embedded/capsule after" in out.getvalue()
    retry = schedule.plan(["fair"], "ci", categories=["capsule"], overrides={"fair.batch_size": 0})
    assert retry[0].trained is False  # the same command again retries it


def ray_installed() -> bool:
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):  # `make test` installs the extra: missing in CI is a broken install step
            pytest.fail("Ray is not installed: pip install -e .[ray]")
        pytest.skip("Ray is an optional extra: pip install -e .[ray]")
    return True


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, dataset) -> tuple[Path, schedule.Report, str, str]:
    """baseline and FAIR on two categories as tasks of a local Ray instance with 2 CPUs, workers in their
    own ADNB_HOME; what the driver's file descriptors received is kept, to show Ray stayed quiet."""
    ray_installed()
    root = tmp_path_factory.mktemp("ray")
    driver, worker = new_home(root / "driver", dataset), new_home(root / "worker", dataset)
    out, fds = io.StringIO(), root / "fds.txt"
    with home_set(driver), captured(fds):
        report = schedule.train_all(["baseline", "fair"], "ci", categories=CATEGORIES, executor="ray", ray_cpus=2,
                                    worker_home=str(worker), out=out)
    return driver, report, out.getvalue(), fds.read_text()


def test_ray_executor_trains_every_job_once_and_quietly(ray_run):
    driver, report, out, fds = ray_run
    assert not report.failed, report.failed
    assert len(report.trained) == 4 and "local Ray instance, up to 2 task(s) at once" in out
    assert fds.strip() == "", f"Ray (or something) wrote to the terminal:\n{fds}"
    with home_set(driver):
        assert_book_loads(report)
        again = schedule.train_all(["baseline", "fair"], "ci", categories=CATEGORIES, executor="ray",
                                   out=io.StringIO())
    assert not again.trained and len(again.skipped) == 4  # nothing to do: Ray is not even started


@pytest.mark.notebook
def test_the_chapter_loads_what_train_all_trained(ray_run, tmp_path):
    """The FAIR chapter on one category after train-all: its record shows train-all's training time and
    no model train-all made is written again (its ablations, other configurations, still train)."""
    from adnb.runtime.runner import run_notebook

    driver, report, _, _ = ray_run
    [ours] = [r for r in map(json.loads, (p.read_text() for p in report.records))
              if r["method"] == "fair" and r["category"] == "capsule"]
    with home_set(driver):
        before = weights_mtimes(driver)
        result = run_notebook("fair", preset="ci", parameters={"category": "capsule"}, output=tmp_path / "fair.ipynb")
    [record] = [r for r in map(json.loads, (p.read_text() for p in result.records)) if r["method"] == "fair"
                and r["config_hash"] == ours["config_hash"]]
    assert record["train_seconds"] == pytest.approx(ours["train_seconds"])
    assert record["checkpoint"] == ours["checkpoint"]
    after = weights_mtimes(driver)
    assert {p: after[p] for p in before} == before, "the chapter retrained a model train-all made"


@pytest.fixture
def tiny_method(tmp_path, monkeypatch) -> Iterator[Path]:
    """The test suite's third-party method ``tiny`` installed for this process and the workers it starts,
    set to kill the first worker that reaches its second epoch; yields the file that records the kill."""
    from adnb.methods import registry
    from third_party_site import install

    sys.modules.pop("tiny_method", None)
    site = install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv("TINY_KILL_AT_EPOCH", "1")
    monkeypatch.setenv("TINY_KILL_MARKER", str(tmp_path / "killed"))
    yield tmp_path / "killed"
    sys.modules.pop("tiny_method", None)


@pytest.mark.slow
def test_a_local_worker_killed_mid_job_is_reported_with_its_log_and_resumed_next_time(home, tiny_method):
    """Two jobs side by side; the worker of one is SIGKILLed in its second epoch. It is reported with the log
    it left, the other finishes (each job has a process of its own), and the next call resumes it."""
    jobs = {"categories": ["capsule"], "overrides": {"tiny.epochs": 3}}
    report = schedule.train_all(["tiny", "baseline"], "ci", jobs=2, out=io.StringIO(), **jobs)
    assert tiny_method.is_file(), "no worker was killed: the test tested nothing"
    [(failed, why)] = report.failed
    assert failed.job.method == "tiny" and "worker process died" in why and "killing this worker" in why
    assert [p.job.method for p in report.trained] == ["baseline"]

    again = schedule.train_all(["tiny", "baseline"], "ci", out=io.StringIO(), **jobs)
    assert [p.job.method for p in again.trained] == ["tiny"] and len(again.skipped) == 1 and not again.failed
    log = (home / "logs/train-all/ci/tiny-embedded-capsule.log").read_text()
    assert "resuming from the checkpoint after epoch 1/3" in log, log
