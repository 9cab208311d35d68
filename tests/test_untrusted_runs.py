"""Runs and bad input on the training/evaluation side: damaged checkpoints, two writers of one run, stores
re-encoded under a run, evaluate from another directory, and config/CLI values out of range (issue #11)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic_stores import DATASET, make_split, make_stores, overrides

from m3jepa.config import load_pipeline
from m3jepa.core.checkpoint import CHECKSUMS
from m3jepa.store import store_path
from m3jepa.train.loop import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SMALL = {"train.max_steps": 10, "train.eval_every": 10, "train.checkpoint_every": 10}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def base_run(stores, tmp_path_factory) -> Path:
    """A finished 10-step run (checkpoints best and latest), trained once for the module."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(load_pipeline(None, overrides(stores, run, **SMALL)))
    return run


def _m3jepa(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "m3jepa", *args], env=ENV, capture_output=True, text=True, cwd=cwd
    )


def _sets(stores: Path, run: Path, **extra) -> list[str]:
    out = []
    for s in overrides(stores, run, **{**SMALL, **extra}):
        out += ["--set", s]
    return out


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    """The CLI failed with exit status 2 and printed exactly one line: the error, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", _flip_byte), ("optimizer.pt", _truncate)])
def test_damaged_checkpoint_file_is_named_by_resume_evaluate_and_lora_export(
    stores, base_run, tmp_path, name, damage
):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    latest = run / "checkpoints" / "latest"
    assert set(json.loads((latest / CHECKSUMS).read_text())["sha256"]) == {
        "model.safetensors", "state.json", "config.toml", "optimizer.pt"
    }
    damage(latest / name)
    expect = f"checkpoint {latest}: {name} "
    resumed = _m3jepa("train-predictor", *_sets(stores, run), "--resume")
    assert expect in _one_error_line(resumed)
    evaluated = _m3jepa("evaluate", "--run", str(run), "--checkpoint", "latest")
    assert expect in _one_error_line(evaluated)
    out = str(tmp_path / "out")
    exported = _m3jepa("lora-export", "--run", str(run), "--out", out, "--checkpoint", "latest")
    assert expect in _one_error_line(exported)
    assert not (run / "metrics.json").exists() and not (tmp_path / "out").exists()


def test_checkpoint_without_checksums_loads_with_a_warning(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "checkpoints" / "best" / CHECKSUMS).unlink()  # as written before checkpoints had checksums
    res = _m3jepa("evaluate", "--run", str(run), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"has no {CHECKSUMS}" in res.stderr
    assert json.loads(res.stdout)["gallery"]["image->text"] == {"queries": 48, "gallery": 96}


def test_a_file_added_to_a_checkpoint_is_named(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "checkpoints" / "best" / "notes.txt").write_text("x")
    line = _one_error_line(_m3jepa("evaluate", "--run", str(run)))
    assert f"notes.txt is not listed in {CHECKSUMS}" in line


# ---------------------------------------------------------------- one writer per run directory


def test_second_train_process_on_a_run_fails_at_once_naming_the_holder(stores, tmp_path):
    run = tmp_path / "run"
    heavy = {"model.dim": 256, "model.hidden": 1024, "train.max_steps": 5000, "train.checkpoint_every": 5}
    first = subprocess.Popen(
        [sys.executable, "-m", "m3jepa", "train-predictor", *_sets(stores, run, **heavy)],
        env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        latest = run / "checkpoints" / "latest" / "state.json"
        deadline = time.time() + 120
        while not latest.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None and latest.exists(), "the first run did not start training"
        assert (run / ".lock").read_text().strip() == str(first.pid)
        began = time.time()
        second = _m3jepa("train-predictor", *_sets(stores, run, **heavy), "--resume")
        line = _one_error_line(second)
        assert f"run {run} is being written by process {first.pid}" in line
        assert time.time() - began < 60 and first.poll() is None  # it failed while the first still ran
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The killed holder's lock file stays behind with its dead pid; the OS freed the flock, so the next
    # writer gets in and fails only on what it was asked (a run exists: --resume), not on the lock.
    assert (run / ".lock").read_text().strip() == str(first.pid)
    again = _m3jepa("train-predictor", *_sets(stores, run, **heavy))
    assert "pass --resume" in _one_error_line(again)


# ---------------------------------------------------------------- the stores a run names


def test_evaluate_from_another_directory_reads_the_runs_stores(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    make_stores(work / "stores", n_train=64, n_val=24, n_test=24)
    elsewhere.mkdir()
    monkeypatch.chdir(work)  # train with a relative encode.store_root, as `m3jepa run` in a folder does
    sets = overrides(Path("stores"), Path("run"), **SMALL)
    train(load_pipeline(None, sets))
    record = json.loads((work / "run" / "stores.json").read_text())
    assert record["store_root"] == str((work / "stores").resolve())
    assert record["splits"]["test"]["read"] is False and record["splits"]["train"]["read"] is True
    res = _m3jepa("evaluate", "--run", str(work / "run"), "--json", cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["gallery"]["image->text"] == {"queries": 24, "gallery": 48}


def _re_encode(root, split: str, groups: int) -> None:
    """What `m3jepa encode --split SPLIT --limit GROUPS` leaves once the old stores are gone: other rows."""
    for modality, encoder in (("image", "syn-image"), ("text", "syn-text")):
        shutil.rmtree(store_path(root, DATASET, split, modality, encoder))
    make_split(root, split, groups)


def test_evaluate_after_the_test_split_is_re_encoded_names_the_store(tmp_path):
    root = make_stores(tmp_path / "stores", n_train=64, n_val=24, n_test=24)
    run = tmp_path / "run"
    train(load_pipeline(None, overrides(root, run, **SMALL)))
    _re_encode(root, "test", 16)
    line = _one_error_line(_m3jepa("evaluate", "--run", str(run)))
    image_store = store_path(root, DATASET, "test", "image", "syn-image").resolve()
    assert f"the test image store {image_store} is not the one run {run} recorded" in line
    assert "rows 24 != 16" in line and "membership" in line
    assert not (run / "metrics.json").exists()


def test_resume_on_re_encoded_train_stores_is_refused(tmp_path):
    root = make_stores(tmp_path / "stores", n_train=64, n_val=24, n_test=24)
    run = tmp_path / "run"
    train(load_pipeline(None, overrides(root, run, **SMALL)))
    _re_encode(root, "train", 48)
    line = _one_error_line(_m3jepa("train-predictor", *_sets(root, run), "--resume"))
    assert "--resume: the train image store" in line and "rows 64 != 48" in line


# ---------------------------------------------------------------- bad config and CLI values


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.num_threads=-1", "train.num_threads=-1 must be positive"),
        ("train.num_threads=0", "train.num_threads=0 must be positive"),
        ("model.dim=1000000", "give at least 2.49e+10 predictor parameters, over the limit of 1e+10"),
        ("train.seed=-1", "train.seed=-1 must be >= 0"),  # it used to fail mid-run, leaving a run folder
        ("train.max_steps=0", "train.max_steps=0 must be positive"),
        ("train.max_steps=-3", "train.max_steps=-3 must be positive"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be a finite number >= 0"),
        ("train.grad_clip=-1.0", "train.grad_clip=-1.0 must be a finite number >= 0"),
        ("train.patience=-1", "train.patience=-1 must be a finite number >= 0"),
        ('train.directions=["image->text","text->image","image->text"]', "lists image->text more than once"),
        ("train.lr=inf", "train.lr=inf must be a finite number > 0"),
        ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
        ("train.lr=0", "train.lr=0.0 must be a finite number > 0"),
        ("train.lr=-1e-3", "train.lr=-0.001 must be a finite number > 0"),
    ],
)
def test_out_of_range_config_is_one_line(tmp_path, setting, message):
    res = _m3jepa("train-predictor", "--run", str(tmp_path / "run"), "--set", setting)
    assert message in _one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_training_pairs_is_refused_at_start(stores, tmp_path):
    res = _m3jepa("train-predictor", *_sets(stores, tmp_path / "run", **{"train.batch_size": 1024}))
    line = _one_error_line(res)
    assert "train.batch_size=1024 is larger than the 512 image->text pairs of split 'train'" in line
    assert "set train.batch_size <= 512" in line
    assert not (tmp_path / "run").exists()


def test_evaluate_protocol_goes_through_the_config_check(base_run):
    line = _one_error_line(_m3jepa("evaluate", "--run", str(base_run), "--protocol", "pared"))
    assert "eval.protocol='pared' is not one of multi, paired" in line
    assert not list(base_run.glob("metrics-*")) and not (base_run / "metrics.json").exists()
    line = _one_error_line(_m3jepa("evaluate", "--run", str(base_run), "--checkpoint", "bset"))
    assert "--checkpoint 'bset' is not one of best, latest" in line


# ---------------------------------------------------------------- ceilings of count-like settings (issue 20)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("encode.workers=-1", "encode.workers=-1 must be >= 0"),
        ("encode.workers=100000", "encode.workers=100,000 is over its ceiling of 4,096"),
        ("encode.threads=-1", "encode.threads=-1 must be positive"),
        ("encode.threads=0", "encode.threads=0 must be positive"),
        ("encode.threads=5000", "encode.threads=5,000 is over its ceiling of 4,096"),
        ("encode.batch_size=100000", "encode.batch_size=100,000 is over its ceiling of 65,536"),
        ("encode.shard_size=0", "encode.shard_size=0 must be positive"),
        ("encode.shard_size=2000000", "encode.shard_size=2,000,000 is over its ceiling of 1,048,576"),
        ("encode.tunable_layers=5000", "encode.tunable_layers=5,000 is over its ceiling of 1,024"),
        ("encode.limit=0", "encode.limit=0 must be positive"),
        ("encode.seed=-1", "encode.seed=-1 must be >= 0"),
        ("encode.seed=4294967296", "encode.seed=4,294,967,296 is over its ceiling of 4,294,967,295"),
        ("model.dim=2000000", "model.dim=2,000,000 is over its ceiling of 1,048,576"),
        ("model.hidden=0", "model.hidden=0 must be positive"),
        ("model.cl_dim=2000000", "model.cl_dim=2,000,000 is over its ceiling of 1,048,576"),
        ("model.num_experts=100000", "model.num_experts=100,000 is over its ceiling of 1,024"),
        ("model.top_k=0", "model.top_k=0 must be positive"),
        ("train.epochs=10000000", "train.epochs=10,000,000 is over its ceiling of 1,000,000"),
        ("train.max_steps=10000000000", "train.max_steps=10,000,000,000 is over its ceiling of 1,000,000,00"),
        ("train.batch_size=2000000", "train.batch_size=2,000,000 is over its ceiling of 1,048,576"),
        ("train.eval_every=10000000000", "train.eval_every=10,000,000,000 is over its ceiling"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be positive"),
        ("train.log_every=-5", "train.log_every=-5 must be positive"),
        ("train.patience=10000000000", "train.patience=10,000,000,000 is over its ceiling"),
        ("train.num_threads=100000", "train.num_threads=100,000 is over its ceiling of 4,096"),
        ("train.seed=4294967296", "train.seed=4,294,967,296 is over its ceiling of 4,294,967,295"),
        ("eval.faiss_threshold=-1", "eval.faiss_threshold=-1 must be >= 0"),
        ("lora.layers=5000", "lora.layers=5,000 is over its ceiling of 1,024"),
        ("lora.r=0", "lora.r=0 must be positive"),
        ("lora.r=2000000", "lora.r=2,000,000 is over its ceiling of 1,048,576"),
    ],
)
def test_every_count_has_a_floor_and_a_ceiling(setting, message):
    from m3jepa.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_pipeline(None, [setting])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_workers_and_threads_past_the_machine_are_refused_before_any_work(tmp_path, monkeypatch):
    """4 per logical CPU where the work runs: checked when encode or train starts (a saved config from a
    larger machine still loads), with one line and nothing created. `encode.workers = 100000` forked
    until the machine's load reached 239."""
    from typer.testing import CliRunner

    import m3jepa.config as config
    from m3jepa.cli import app

    monkeypatch.setattr(config, "cpu_count", lambda: 2)
    stores = tmp_path / "stores"
    for option, value, key in (("--workers", "9", "encode.workers"), ("--threads", "9", "encode.threads"),
                               ("--workers", "-1", "encode.workers"), ("--threads", "-1", "encode.threads")):
        res = CliRunner().invoke(app, ["encode", "--dataset", "tuxpaint", "--split", "val", "--store-root",
                                       str(stores), option, value])
        assert res.exit_code == 2 and res.stderr.count("error: ") == 1, res.output
        line = res.stderr.strip()
        assert line.startswith(f"error: {key}={value}") and "Traceback" not in res.output, line
        if value == "9":
            assert "over this machine's ceiling of 8 (4 per logical CPU; this machine has 2)" in line
    assert not stores.exists()
    assert load_pipeline(None, ["encode.workers=9", "train.num_threads=9"]).encode.workers == 9  # loads
    run = tmp_path / "run"
    with pytest.raises(config.ConfigError, match=r"train.num_threads=9 is over this machine's ceiling of 8"):
        train(load_pipeline(None, [f"run_dir={run}", "train.num_threads=9"]))
    assert not run.exists()
    res = CliRunner().invoke(app, ["search", "--index", str(tmp_path), "--text", "x", "--threads", "9"])
    assert res.exit_code == 2 and "--threads 9 is over this machine's ceiling of 8" in res.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\ndirections = " + "[" * 5000 + "]" * 5000 + "\n",
         "nested deeper than Python's parser follows"),
        ("[train]\nepochs = " + "9" * 5000 + "\n", "a number of over 4,300 digits"),
        ("[train]\nlr = 1e-3\n[model]\ndim = 64\n", None),  # valid; made invalid UTF-8 below
        ("[train]\ndirections = " + "{a=" * 300 + "1" + "}" * 300 + "\n",
         "train.directions must be a list, got {'a': {'a': {'a': {'a': {'a': {'a': {...}}}}}}}"),
    ],
    ids=["arrays-5000-deep", "5000-digits", "invalid-utf8", "tables-300-deep"],
)
def test_a_hostile_pipeline_file_is_one_line_naming_it(tmp_path, text, message):
    from typer.testing import CliRunner

    from m3jepa.cli import app
    from m3jepa.config import ConfigError

    path = tmp_path / "p.toml"
    if message is None:
        path.write_bytes(text.encode().replace(b"dim", b"d\xffm"))
        message = f"{path}:4: not valid UTF-8 (byte 0xff at byte 27); save it as UTF-8"
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    assert message in str(e.value) and len(str(e.value)) < 300
    run = str(tmp_path / "run")
    res = CliRunner().invoke(app, ["train-predictor", "--pipeline", str(path), "--run", run])
    assert res.exit_code == 2 and res.stderr.count("error: ") == 1 and message in res.stderr, res.output
    assert not (tmp_path / "run").exists()


def test_set_values_too_deep_or_too_long_are_one_line():
    from m3jepa.config import ConfigError

    with pytest.raises(ConfigError, match=r"--set train.epochs: it holds a number of over 4,300 digits"):
        load_pipeline(None, ["train.epochs=" + "9" * 5000])
    with pytest.raises(ConfigError, match=r"--set train.directions: its arrays or tables are nested deeper"):
        load_pipeline(None, ["train.directions=" + "[" * 5000 + "]" * 5000])


# ---------------------------------------------------------------- the memory a model needs (issue 20)


def test_the_parameter_lower_bound_never_exceeds_the_built_model():
    from m3jepa.config import LossConfig, ModelConfig
    from m3jepa.core.memory import parameter_lower_bound
    from m3jepa.core.objective import Objective

    dims = {"image": 48, "text": 32, "audio": 20}
    for predictor in ("moe", "mlp", "linear"):
        for gates in ("multi", "shared"):
            for target in ("raw", "standardized"):
                model = ModelConfig(predictor=predictor, dim=24, hidden=40, num_experts=5, top_k=2, cl_dim=16,
                                    gates=gates)
                built = Objective(model, LossConfig(pred_target=target), dims)
                n = sum(t.numel() for t in (*built.parameters(), *built.buffers()))
                bound = parameter_lower_bound(model, dims)
                assert 0 < bound <= n, (predictor, gates, target, bound, n)
                if predictor == "moe":  # the experts dominate an MoE: the bound is close
                    assert bound > 0.5 * n, (gates, target, bound, n)


def test_a_predictor_that_cannot_fit_is_refused_before_the_run_starts(stores, tmp_path, monkeypatch):
    """dim 4,096 x hidden 4,096 x 2 experts is 67M parameters, 1.1 GB to train: over a 1 GB machine."""
    import m3jepa.core.memory as memory
    from m3jepa.config import ConfigError

    monkeypatch.setattr(memory, "device_bytes", lambda device: 10**9)
    run = tmp_path / "run"
    sets = overrides(stores, run, **{**SMALL, "train.max_steps": 1, "model.dim": 4096, "model.hidden": 4096,
                                      "model.num_experts": 2, "model.top_k": 1})
    with pytest.raises(ConfigError) as e:
        train(load_pipeline(None, sets))
    line = str(e.value)
    assert "the predictor has at least 67," in line and "training it holds 16 bytes each, 1.1 GB" in line
    assert "dim=4,096, hidden=4,096, num_experts=2" in line and "more than the 1.0 GB of cpu" in line
    assert not run.exists()


@pytest.fixture(scope="module")
def export(base_run, tmp_path_factory) -> Path:
    from m3jepa.api.export import export_run

    return export_run(base_run, tmp_path_factory.mktemp("export") / "model")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["dims"].update(image="abc"), "dims['image'] must be a whole number of dimensions"),
        (lambda m: m["dims"].update(text=10**12), "dims['text']=1,000,000,000,000 is not a latent width"),
        (lambda m: m["dims"].update(text=0), "dims['text']=0 is not a latent width m3jepa takes (1 to 1,0"),
        (lambda m: m.update(dims=[48, 32]), "dims must be an object of modality -> latent width"),
        (lambda m: m["pipeline"]["model"].update(top_k="two"), "pipeline: model.top_k must be an integer"),
        # under the 1e10 cap, but 17 GB to load: over a 1 GB machine
        (lambda m: m["pipeline"]["model"].update(dim=4096, hidden=65536, num_experts=4),
         "the predictor has at least 2,147,975,168 parameters"),
    ],
)
def test_an_edited_export_config_is_one_line_naming_the_key(export, tmp_path, monkeypatch, edit, message):
    import m3jepa.core.memory as memory
    from m3jepa.api import load
    from m3jepa.api.raw import ApiError

    monkeypatch.setattr(memory, "device_bytes", lambda device: 10**9)
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    meta = json.loads((folder / "config.json").read_text())
    edit(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ApiError) as e:
        load(folder, device="cpu")
    assert str(e.value).startswith(f"{folder / 'config.json'}: ") and message in str(e.value), str(e.value)
    (folder / "config.json").write_text('{"format": ' * 5000 + "1" + "}" * 5000)
    with pytest.raises(ApiError, match="nested deeper than Python's parser follows"):
        load(folder, device="cpu")


@pytest.mark.parametrize(("dims", "message"), [
    ("image=abc", "--dims 'image=abc' is not modality=width, e.g. image=1024"),
    ("image=1024,text", "--dims 'text' is not modality=width"),
    ("image=1000000000000", "--dims['image']=1,000,000,000,000 is not a latent width m3jepa takes"),
])
def test_model_info_dims_name_the_item(dims, message):
    from typer.testing import CliRunner

    from m3jepa.cli import app

    res = CliRunner().invoke(app, ["model-info", "--dims", dims])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert res.stderr.count("error: ") == 1 and "Traceback" not in res.output
