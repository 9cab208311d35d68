"""What stages 2 and 3 write and read back, on damaged, moving or stale input (issue #20): exports carry
checksums and are byte-reproducible, a run being trained is read as a verified snapshot and never evaluated
into, stale stores are refused by train-predictor and evaluate, and a full disk is one line that keeps the
previous good artefact."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_stores import DIMS, ENCODERS, make_stores, overrides
from typer.testing import CliRunner

import m3jepa
from m3jepa.api.export import export_run
from m3jepa.api.raw import ApiError
from m3jepa.cli import app
from m3jepa.config import load_pipeline
from m3jepa.core.checkpoint import verify_checksums
from m3jepa.core.errors import StoreDataError
from m3jepa.core.runlock import RunLockedError
from m3jepa.data import get_dataset
from m3jepa.data.records import content_digest, membership_fingerprint, row_fingerprint
from m3jepa.files import WriteError, disk_errno, refused_writes
from m3jepa.store import Manifest, StoreWriter, rows_from_records, store_path
from m3jepa.store.manifest import resolved_root
from m3jepa.train.loop import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SMALL = {"train.max_steps": 10, "train.eval_every": 10, "train.checkpoint_every": 10}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"), n_train=128, n_val=32, n_test=32)


@pytest.fixture(scope="module")
def base_run(stores, tmp_path_factory) -> Path:
    """A finished 10-step run, trained once for the module."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(load_pipeline(None, overrides(stores, run, **SMALL)))
    return run


@pytest.fixture(scope="module")
def export(base_run, tmp_path_factory) -> Path:
    return export_run(base_run, tmp_path_factory.mktemp("export") / "model")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------- exports


def test_re_exports_of_one_checkpoint_are_byte_identical(base_run, export, tmp_path):
    """safetensors writes its metadata map in a random order: with two keys, 1 in 2 re-exports differed."""
    first = _files(export)
    assert set(first) == {"config.json", "model.safetensors", "README.md", "checksums.json"}
    for n in range(4):
        again = export_run(base_run, tmp_path / f"again{n}")
        assert _files(again) == first


def _flip(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _symlink_weights(folder: Path) -> None:
    elsewhere = folder.parent / "elsewhere.safetensors"
    shutil.copyfile(folder / "model.safetensors", elsewhere)  # even an identical copy: a link is refused
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(elsewhere)


def _edit_config(key: str, value: object):
    def edit(folder: Path) -> None:  # a valid setting that keeps every tensor's shape: the weights load
        meta = json.loads((folder / "config.json").read_text())
        assert meta["pipeline"]["model"][key] != value
        meta["pipeline"]["model"][key] = value
        (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return edit


@pytest.mark.parametrize(("damage", "named", "says"), [
    (_flip, "model.safetensors", "does not match its sha256 in checksums.json"),
    (_symlink_weights, "model.safetensors", "is a symbolic link; an export holds its own files"),
    (_edit_config("top_k", 1), "config.json", "was changed after the export was written"),
    (_edit_config("routing", "softmax_topk"), "config.json", "was changed after the export was written"),
], ids=["flipped-byte", "symlinked-weights", "top_k", "routing"])
def test_a_damaged_export_is_refused_naming_the_file_and_the_fix(base_run, export, tmp_path, damage, named,
                                                                 says):
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    damage(folder)
    with pytest.raises(ApiError) as e:
        m3jepa.load(folder)
    message = str(e.value)
    assert message.startswith(f"{folder / named} ") and says in message, message
    fix = f"export it again (`m3jepa export --run {base_run.resolve()} --out DIR --force`)"
    assert message.endswith(f"{fix} or restore the folder from a copy") or "symbolic link" in message
    assert "\n" not in message


def test_a_damaged_export_is_one_line_for_index_too(export, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    _edit_config("top_k", 1)(folder)
    res = CliRunner().invoke(app, ["index", "--run", str(folder), "--split", "test", "--modality", "image",
                                   "--device", "cpu"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: {folder / 'config.json'} was changed after the export was written")
    assert not (tmp_path / "model.embedded").exists()  # nothing embedded with a model it could not trust


def test_a_reformatted_export_config_still_loads(export, tmp_path):
    """The checksum covers config.json's meaning, not its layout: re-indenting it is no damage."""
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(meta, indent=4, sort_keys=False))
    assert m3jepa.load(folder).directions == m3jepa.load(export).directions


def test_an_export_written_before_checksums_loads_with_a_warning(export, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    (folder / "checksums.json").unlink()
    with pytest.raises(ApiError, match="has no checksums.json, which its format version needs"):
        m3jepa.load(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["format_version"] = 1  # as m3jepa wrote exports before they had checksums
    (folder / "config.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        m3jepa.load(folder)
    assert "exported before exports carried checksums (format version 1)" in caplog.text


def test_a_symlink_in_a_run_checkpoint_is_refused(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    weights = run / "checkpoints" / "best" / "model.safetensors"
    copy = tmp_path / "weights.safetensors"
    shutil.copyfile(weights, copy)
    weights.unlink()
    weights.symlink_to(copy)
    with pytest.raises(ApiError, match=r"model.safetensors is a symbolic link; a checkpoint holds its own "):
        m3jepa.load(run)


def test_export_refuses_an_out_inside_the_run_or_around_it(base_run, export, tmp_path):
    run = tmp_path / "runs" / "run"
    shutil.copytree(base_run, run)
    before = _files(run)
    cases = ((run, "is the run"), (run / "model", "is inside the run"), (run.parent, "holds the run"))
    for out, where in cases:
        with pytest.raises(ApiError) as e:
            export_run(run, out, force=True)
        assert str(e.value) == (f"--out {out} {where} {run}: an export is written beside a run, never in "
                                "it or around it (--force would delete the run); choose an --out outside "
                                "the run")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "IMG_0001.png").write_bytes(b"mine")
    with pytest.raises(ApiError, match=r"holds files but no m3jepa export .*--force replaces only an export"):
        export_run(run, other, force=True)
    assert _files(run) == before and (other / "IMG_0001.png").read_bytes() == b"mine"
    replaced = tmp_path / "model"
    shutil.copytree(export, replaced)
    assert export_run(run, replaced, force=True) == replaced  # an export is replaced with --force


# ---------------------------------------------------------------- a run still being trained


@pytest.mark.slow
def test_a_run_being_trained_is_read_as_a_snapshot_and_evaluate_waits(stores, tmp_path, caplog):
    run = tmp_path / "run"
    heavy = {"model.dim": 256, "model.hidden": 1024, "train.max_steps": 5000, "train.checkpoint_every": 2,
             "train.eval_every": 10}
    sets = [a for s in overrides(stores, run, **{**SMALL, **heavy}) for a in ("--set", s)]
    trainer = subprocess.Popen([sys.executable, "-m", "m3jepa", "train-predictor", *sets], env=ENV,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        best = run / "checkpoints" / "best" / "state.json"
        deadline = time.time() + 180
        while not best.exists() and time.time() < deadline and trainer.poll() is None:
            time.sleep(0.05)
        assert trainer.poll() is None and best.exists(), "the run did not start training"
        from m3jepa.eval.evaluate import evaluate_run

        with pytest.raises(RunLockedError) as e:
            evaluate_run(run)
        assert str(e.value).startswith(f"run {run} is being written by process {trainer.pid} (it holds "
                                       f"{run / '.lock'}); evaluate writes its metrics into the run: wait")
        assert not (run / "metrics.json").exists()
        with caplog.at_level(logging.WARNING, logger="m3jepa.core.trained"):
            for _ in range(4):  # latest is swapped every 2 steps: each read is a verified snapshot
                m3jepa.load(run, checkpoint="latest")
            out = export_run(run, tmp_path / "export", checkpoint="latest")
        steps = [int(r.getMessage().split(" at step ")[1].split()[0]) for r in caplog.records
                 if "read a consistent snapshot of latest" in r.getMessage()]
        assert len(steps) == 5 and steps == sorted(steps), caplog.text
        assert trainer.poll() is None  # the trainer never noticed its readers
        assert m3jepa.load(out).directions == ["image->text", "text->image"]  # verified against its checksums
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()


# ---------------------------------------------------------------- stale stores in stages 2 and 3


def _jsonl_dataset(folder: Path, groups: dict[str, int]) -> Path:
    """pairs.jsonl with two captions per image (one small PNG each), `groups` = {split: count}."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for split, n in groups.items():
        for i in range(n):
            pid = f"{split}{i:03d}"
            Image.new("RGB", (8, 8), (i, 3 * i % 256, 40)).save(folder / "img" / f"{pid}.png")
            lines.append(json.dumps({"id": pid, "image": f"img/{pid}.png", "split": split,
                                     "caption": [f"picture {pid}", f"another view of {pid}"]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _stores_of(data: Path, root: Path) -> Path:
    """Stores of the jsonl dataset at `data`, as `m3jepa encode` records them (membership, per-row content
    fingerprints, the data root), with the synthetic features of synthetic_stores (captions a linear map of
    their image plus noise), so a predictor trains on them in seconds."""
    ds = get_dataset("jsonl", str(data))
    mapping = np.random.default_rng(12345).standard_normal((DIMS["image"], DIMS["text"])) / 6
    for split in ("train", "val", "test"):
        rng = np.random.default_rng(len(split))
        images = ds.records(split, "image")
        latent = {r.group_id: rng.standard_normal(DIMS["image"]).astype(np.float32) for r in images}
        texts = ds.records(split, "text")
        feats = {"image": np.stack([latent[r.group_id] for r in images]),
                 "text": np.stack([latent[r.group_id] @ mapping + 0.3 * rng.standard_normal(DIMS["text"])
                                   for r in texts]).astype(np.float32)}
        for modality, records in (("image", images), ("text", texts)):
            content = [row_fingerprint(r, "stat") for r in records]
            manifest = Manifest(
                dataset="jsonl", split=split, modality=modality, membership=membership_fingerprint(records),
                rows=len(records), encoder=ENCODERS[modality], encoder_revision="r1", pooling="none",
                layers="none", dim=DIMS[modality], dtype="float32", format="zarr", shard_size=64,
                content=content_digest(content), content_hash="stat", data_root=str(resolved_root(data)))
            path = store_path(root, "jsonl", split, modality, ENCODERS[modality], data_root=str(data))
            with StoreWriter(path, manifest) as w:
                for index, start, end in w.planned_shards():
                    w.write_shard(index, feats[modality][start:end])
                w.finalize(rows_from_records(records, content=content), [])
    return root


def _edit_caption(data: Path, pair: str, caption: str) -> None:
    lines = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    for line in lines:
        if line["id"] == pair:
            line["caption"][0] = caption
    (data / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_train_and_evaluate_refuse_stores_the_dataset_has_changed_under(tmp_path, caplog):
    data = _jsonl_dataset(tmp_path / "data", {"train": 64, "val": 16, "test": 16})
    root = _stores_of(data, tmp_path / "stores")
    sets = overrides(root, tmp_path / "run", **SMALL, **{"encode.dataset": "jsonl", "encode.root": str(data)})
    train(load_pipeline(None, sets))  # fresh: trains
    from m3jepa.eval.evaluate import evaluate_run

    _edit_caption(data, "test003", "a caption written after the stores")
    test_text = store_path(root, "jsonl", "test", "text", "syn-text", data_root=str(data))
    res = CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "run")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.strip() == (
        f"error: evaluate: {test_text} is stale: 1 of 32 rows changed since it was written (1 captions; "
        f"first: test003#0); re-encode it (`m3jepa encode --dataset jsonl --root {data} --split test "
        f"--modality text --store-root {root} --text-encoder syn-text --force`), then train on the new "
        "stores")
    assert not (tmp_path / "run" / "metrics.json").exists()

    _edit_caption(data, "train010", "edited too")
    again = overrides(root, tmp_path / "run2", **SMALL,
                      **{"encode.dataset": "jsonl", "encode.root": str(data)})
    with pytest.raises(StoreDataError, match=r"^train-predictor: .*/train/text/syn-text is stale: 1 of 128 "
                                             r"rows changed since it was written \(1 captions; first: "
                                             r"train010#0\)"):
        train(load_pipeline(None, again))
    assert not (tmp_path / "run2").exists()  # refused before anything was written

    shutil.move(data, tmp_path / "moved")  # only the stores are here now: one warning, and it scores
    with caplog.at_level(logging.WARNING, logger="m3jepa.core.freshness"):
        metrics = evaluate_run(tmp_path / "run")
    assert metrics.to_json()["gallery"]["image->text"] == {"queries": 16, "gallery": 32}
    warnings = [r.getMessage() for r in caplog.records if r.name == "m3jepa.core.freshness"]
    assert len(warnings) == 1 and warnings[0].startswith("evaluate: dataset 'jsonl' cannot be read here (")
    assert warnings[0].endswith("if it was edited, re-encode with `m3jepa encode --force` where the "
                                "dataset is")


# ---------------------------------------------------------------- a full disk


def test_a_refused_write_is_one_line_and_removes_its_temporary_files(tmp_path):
    import errno

    partial = tmp_path / "out.tmp"
    partial.mkdir()
    (partial / "half").write_bytes(b"x" * 100)
    with pytest.raises(WriteError) as e, refused_writes(tmp_path, need=3 << 20, remove=[partial],
                                                        removed="the partial out.tmp", kept="the old out"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial / "half"))
    assert not partial.exists()
    assert str(e.value).startswith(f"cannot write {tmp_path}: the disk is full (No space left on device): ")
    assert str(e.value).endswith("free there, about 3.0 MiB needed; removed the partial out.tmp; kept the "
                                 "old out; free space on it, then rerun the same command")
    # native writers report the OS error in their text (the messages of a real full tmpfs)
    assert disk_errno(RuntimeError("Error while serializing: I/O error: No space left on device (os error "
                                   "28)")) == errno.ENOSPC
    assert disk_errno(RuntimeError("Error: 'ret == (size * 4)' failed: write error in /x/i.faiss: 65491 != "
                                   "256000 (No space left on device)")) == errno.ENOSPC
    assert disk_errno(RuntimeError("unexpected pos 576 vs 534")) is None
    # a file it could not read elsewhere (a store) is no write of this folder: it passes through as it is
    with pytest.raises(PermissionError), refused_writes(tmp_path / "run"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere/stores/x.zarr")
    refused = pytest.raises(WriteError, match=r"the folder is not writable \(Permission denied\); make it ")
    with refused, refused_writes(tmp_path / "run"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "run" / ".lock"))


FULL_DISK = textwrap.dedent('''
    """Run inside `unshare -rm` (a private mount namespace): each case on a small tmpfs that fills up."""
    import json, logging, os, shutil, subprocess, sys
    from pathlib import Path
    from typer.testing import CliRunner
    from m3jepa.cli import app

    # the log to the real stderr: the CLI's own set-up would bind it to CliRunner's stream, closed after
    logging.basicConfig(level=logging.INFO, stream=sys.__stderr__)

    disk, run, sets = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    disk.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True)
    PAGE = 4096

    def used():
        st = os.statvfs(disk)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def cap(size):  # the tmpfs can hold `size` bytes from now on
        pages = max(size // PAGE, used() // PAGE + 1)
        subprocess.run(["mount", "-o", f"remount,size={pages * PAGE}", str(disk)], check=True)

    def du(path):
        return sum(-(-p.stat().st_size // PAGE) * PAGE for p in Path(path).rglob("*") if p.is_file())

    def m3(*args):
        r = CliRunner().invoke(app, list(args))
        return {"code": r.exit_code, "err": r.stderr, "out": r.stdout}

    out = {}
    # train-predictor: a probe run measures the space; the real one has room for all but half of `best`
    probe = disk / "probe"
    m3("train-predictor", *sum((["--set", s] for s in sets + [f'run_dir="{probe}"']), []))
    full, best = du(probe), du(probe / "checkpoints" / "best")
    shutil.rmtree(probe)
    cap(used() + full - best // 2)
    target = disk / "run"
    out["train"] = m3("train-predictor", *sum((["--set", s] for s in sets + [f'run_dir="{target}"']), []))
    out["train_left"] = sorted(p.name for p in (target / "checkpoints").iterdir())
    cap(256 << 20)
    resume_sets = sets + [f'run_dir="{target}"']
    out["resumed"] = m3("train-predictor", *sum((["--set", s] for s in resume_sets), []), "--resume")

    # export --force over a good export, with room for half a second one
    model = disk / "model"
    assert m3("export", "--run", run, "--out", str(model))["code"] == 0
    good = {p.name: p.read_bytes() for p in model.iterdir()}
    cap(used() + du(model) // 2)
    out["export"] = m3("export", "--run", run, "--out", str(model), "--force")
    out["export_kept"] = {p.name: p.read_bytes() for p in model.iterdir()} == good
    out["export_left"] = sorted(p.name for p in disk.iterdir())
    cap(256 << 20)

    # index --force over a good index
    index = disk / "image.index"
    args = ("index", "--run", run, "--split", "test", "--modality", "image", "--device", "cpu", "--out",
            str(index))
    assert m3(*args)["code"] == 0, "first index"
    good = {p.name: p.read_bytes() for p in index.iterdir()}
    cap(used() + du(index) // 2)
    out["index"] = m3(*args, "--force")
    out["index_kept"] = {p.name: p.read_bytes() for p in index.iterdir()} == good
    out["index_left"] = sorted(p.name for p in disk.iterdir())
    print("RESULT " + json.dumps(out))
''')


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_previous_artefact(stores, base_run, tmp_path):
    """A real full file system: a small tmpfs in a private mount namespace (`unshare -rm`, no root needed
    where user namespaces are allowed), filled by train-predictor, export and index in turn."""
    if not _unshare_works():
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    sets = overrides(stores, tmp_path / "unused", **{**SMALL, "train.checkpoint_every": 5})
    sets = [s for s in sets if not s.startswith("run_dir=")]
    res = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK, str(tmp_path / "disk"), str(run),
                          json.dumps(sets)], env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    disk = tmp_path / "disk"
    for case, folder, removed, kept in [
        ("train", disk / "run" / "checkpoints", "the partial best.tmp", None),
        ("export", disk, "the partial model.tmp-export", f"the export at {disk / 'model'} as it was"),
        ("index", disk, None, f"the index at {disk / 'image.index'} as it was"),
    ]:
        r = out[case]
        errors = [ln for ln in r["err"].splitlines() if ln.startswith("error: ")]
        assert r["code"] == 2 and len(errors) == 1 and "Traceback" not in r["err"], (case, r)
        line = errors[0]
        full = f"error: cannot write {folder}: the disk is full (No space left on device): "
        assert line.startswith(full), line
        assert " free there, about " in line and " needed; removed " in line, line
        assert removed is None or f"; removed {removed};" in line, line
        assert kept is None or f"; kept {kept};" in line, line
    assert out["train_left"] == ["latest"]  # best.tmp removed; latest (step 5) whole, and the run resumes
    assert out["resumed"]["code"] == 0, out["resumed"]
    assert out["export_kept"] and out["export_left"] == ["model", "run"]
    assert out["index_kept"] and out["index_left"] == ["image.index", "model", "run"]


def test_latest_survives_a_failed_checkpoint_write(base_run, tmp_path, monkeypatch):
    """In-process, where no namespace is allowed: the optimizer file's write fails as a full disk would."""
    import errno

    from m3jepa.core import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    latest = run / "checkpoints" / "latest"
    before = _files(latest)
    loaded = ckpt.load_checkpoint(latest, with_optimizer=True)
    real = Path.write_bytes

    def full(self, data):
        if self.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    from m3jepa.core.objective import Objective

    objective = Objective(loaded.cfg.model, loaded.cfg.loss, loaded.state.dims)
    objective.load_state_dict(loaded.weights)
    import torch

    optimizer = torch.optim.AdamW(objective.parameters())
    with pytest.raises(WriteError, match=r"; removed the partial latest.tmp; kept the previous latest "
                                         r"checkpoint; free space on it, then resume the run"):
        ckpt.save_checkpoint(latest, loaded.cfg, objective, loaded.state, optimizer)
    assert sorted(p.name for p in latest.parent.iterdir()) == ["best", "latest"]
    assert _files(latest) == before and verify_checksums(latest)
