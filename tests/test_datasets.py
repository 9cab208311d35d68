"""Datasets: tuxpaint on the real stamps, miniature COCO/Flickr30k/jsonl trees, and the split function."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3jepa.data import DEFAULT_ENCODERS, get_dataset, list_datasets
from m3jepa.data.records import DatasetError, Record
from m3jepa.data.splits import assign_clusters, natural_key, split_groups

SPLITS = ("train", "val", "test")


def _all(ds, modality: str) -> list[Record]:
    return [r for s in ds.splits() for r in ds.records(s, modality)]


def _check_contract(ds) -> None:
    """row_id = position, ids unique per (split, modality), every text group has media."""
    for split in ds.splits():
        media_groups = set()
        for m in ds.modalities():
            recs = ds.records(split, m)
            assert [r.row_id for r in recs] == list(range(len(recs)))
            assert len({r.sample_id for r in recs}) == len(recs)
            assert all(r.modality == m for r in recs)
            if m != "text":
                media_groups |= {r.group_id for r in recs}
        assert {r.group_id for r in ds.records(split, "text")} == media_groups


# ------------------------------------------------------------------ registry


def test_registry_names_and_unknown():
    names = list_datasets()
    assert names == sorted(names)
    assert {"coco", "flickr30k", "jsonl", "tuxpaint", "tuxpaint-audio", "asterisk"} <= set(names)
    assert set(DEFAULT_ENCODERS) == set(names)  # every dataset has default encoders
    assert DEFAULT_ENCODERS["coco"] == {"image": "dinov2-large", "text": "llama3-8b"}
    with pytest.raises(DatasetError, match="unknown dataset 'no-such'.*coco, .*tuxpaint"):
        get_dataset("no-such")


def test_missing_roots_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install tuxpaint-stamps-default"):
        get_dataset("tuxpaint", str(tmp_path / "nope"))
    for name in ("coco", "flickr30k", "jsonl"):
        with pytest.raises(DatasetError, match="--root"):
            get_dataset(name)
    with pytest.raises(DatasetError, match="dataset_coco.json"):
        get_dataset("coco", str(tmp_path))


# ------------------------------------------------------------------ tuxpaint (real stamps)


@pytest.fixture(scope="module")
def tux(tuxpaint_root):
    return get_dataset("tuxpaint", str(tuxpaint_root))


def _reference_stamps(root: Path) -> dict[str, str]:
    """Independent scan: stamp id → first caption line, for every PNG with a .txt beside it."""
    out = {}
    for png in root.rglob("*.png"):
        txt = png.with_suffix(".txt")
        if txt.is_file():
            out[png.relative_to(root).with_suffix("").as_posix()] = (
                txt.read_text("utf-8").split("\n")[0].strip()
            )
    return out


def test_tuxpaint_counts_and_payloads(tux, tuxpaint_root):
    ref = _reference_stamps(tuxpaint_root)
    images, texts, audio = _all(tux, "image"), _all(tux, "text"), _all(tux, "audio")
    assert len(images) == len(ref) == 785
    assert {r.group_id: r.payload for r in texts} == ref
    assert all(r.payload == str(tuxpaint_root / f"{r.group_id}.png") for r in images)
    assert all(r.sample_id == r.group_id for r in images + texts + audio)
    with_ogg = {g for g in ref if (tuxpaint_root / f"{g}.ogg").is_file()}
    assert {r.group_id for r in audio} == with_ogg
    assert all(r.payload.endswith(".ogg") and "_desc" not in r.payload for r in audio)
    assert tux.modalities() == ["image", "text", "audio"]
    assert tux.skipped == []
    _check_contract(tux)


def test_tuxpaint_split_fractions_and_caption_clusters(tux):
    sizes = {s: len(tux.records(s, "image")) for s in SPLITS}
    assert abs(sizes["train"] / 785 - 0.8) < 0.03 and min(sizes["val"], sizes["test"]) > 60
    sides: dict[str, set[str]] = defaultdict(set)
    for s in SPLITS:
        for r in tux.records(s, "text"):
            sides[r.payload].add(s)
    shared = [c for c, count in Counter(r.payload for r in _all(tux, "text")).items() if count > 1]
    assert len(shared) > 50  # e.g. "A flower." is the caption of several stamps
    assert all(len(sides[c]) == 1 for c in shared)


def test_tuxpaint_seeded_split_is_deterministic(tux, tuxpaint_root):
    def assignment(ds):
        return {r.group_id: s for s in SPLITS for r in ds.records(s, "image")}

    again = get_dataset("tuxpaint", str(tuxpaint_root), seed=0)
    other = get_dataset("tuxpaint", str(tuxpaint_root), seed=1)
    assert assignment(again) == assignment(tux)
    assert tux.records("test", "text") == again.records("test", "text")
    assert assignment(other) != assignment(tux)


def test_tuxpaint_limit_keeps_first_groups(tux, tuxpaint_root):
    small = get_dataset("tuxpaint", str(tuxpaint_root), limit=5)
    for s in SPLITS:
        expected = sorted({r.group_id for r in tux.records(s, "image")}, key=natural_key)[:5]
        assert [r.group_id for r in small.records(s, "image")] == expected
        assert [r.group_id for r in small.records(s, "text")] == expected
    with pytest.raises(DatasetError, match="limit"):
        get_dataset("tuxpaint", str(tuxpaint_root), limit=0)


def test_tuxpaint_empty_caption(tmp_path, copy_png):
    for name, caption in (("a/cat", "A cat.\nfr.utf8=Un chat."), ("a/dog", "\n"), ("b/fox", "A fox.")):
        copy_png(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    (tmp_path / "b/vector.svg").write_text("<svg/>")
    (tmp_path / "b/vector.txt").write_text("SVG only.")
    with pytest.raises(DatasetError, match="a/dog.*empty caption.*--skip-bad"):
        get_dataset("tuxpaint", str(tmp_path))
    ds = get_dataset("tuxpaint", str(tmp_path), skip_bad=True)
    assert sorted(r.payload for r in _all(ds, "text")) == ["A cat.", "A fox."]
    assert [sid for sid, _ in ds.skipped] == ["a/dog"]


# ------------------------------------------------------------------ coco (miniature trees)


def _caps(gid: int, n: int = 5) -> list[str]:
    return [f"Picture {gid}, caption {k}." for k in range(n)]


def test_coco_karpathy_layout(tmp_path, copy_png):
    plan = [
        (11, "train", "train2014"),
        (12, "restval", "val2014"),
        (13, "val", "val2014"),
        (14, "test", "val2014"),
        (15, "test", "val2014"),
    ]
    images = []
    for i, (cocoid, split, folder) in enumerate(plan):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        copy_png(tmp_path / folder / name, i)
        sents = [
            {"raw": c + "  ", "sentid": cocoid * 100 + k, "imgid": i} for k, c in enumerate(_caps(cocoid))
        ]
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "cocoid": cocoid,
                "imgid": i,
                "sentences": sents,
            }
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images[::-1], "dataset": "coco"}))
    ds = get_dataset("coco", str(tmp_path))
    assert ds.splits() == list(SPLITS) and ds.modalities() == ["image", "text"]
    assert [r.group_id for r in ds.records("train", "image")] == ["11", "12"]  # train + restval
    assert [r.group_id for r in ds.records("test", "image")] == ["14", "15"]
    test_text = ds.records("test", "text")
    assert Counter(r.group_id for r in test_text) == {"14": 5, "15": 5}
    assert [r.sample_id for r in test_text[:2]] == ["1400", "1401"]
    assert test_text[0].payload == "Picture 14, caption 0."
    assert ds.records("val", "image")[0].payload == str(
        tmp_path / "val2014" / "COCO_val2014_000000000013.jpg"
    )
    _check_contract(ds)


def _write_official(root: Path, year: str, copy_png, ids: dict[str, list[int]]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, image_ids in ids.items():
        imgs = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in image_ids]
        anns = [
            {"id": i * 10 + k, "image_id": i, "caption": c} for i in image_ids for k, c in enumerate(_caps(i))
        ]
        for i in image_ids:
            copy_png(root / f"{split}{year}" / f"{i:012d}.jpg", i)
        (root / "annotations" / f"captions_{split}{year}.json").write_text(
            json.dumps({"images": imgs, "annotations": anns[::-1]})
        )


def test_coco_official_layout_prefers_2017(tmp_path, copy_png):
    _write_official(tmp_path, "2014", copy_png, {"train": [1], "val": [2]})
    _write_official(tmp_path, "2017", copy_png, {"train": [3, 4, 10], "val": [5]})
    ds = get_dataset("coco", str(tmp_path))
    assert ds.splits() == ["train", "val"]
    assert [r.group_id for r in ds.records("train", "image")] == ["3", "4", "10"]
    train_text = ds.records("train", "text")
    assert Counter(r.group_id for r in train_text) == {"3": 5, "4": 5, "10": 5}
    assert [r.sample_id for r in train_text[:5]] == ["30", "31", "32", "33", "34"]
    assert ds.records("val", "image")[0].payload.endswith("val2017/000000000005.jpg")
    _check_contract(ds)


def test_coco_missing_image_and_empty_caption(tmp_path, copy_png):
    _write_official(tmp_path, "2017", copy_png, {"train": [1, 2], "val": [3]})
    (tmp_path / "train2017" / "000000000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"coco: 2: image file .*000000000002\.jpg is missing.*--skip-bad"):
        get_dataset("coco", str(tmp_path))
    path = tmp_path / "annotations" / "captions_val2017.json"
    meta = json.loads(path.read_text())
    meta["annotations"][0]["caption"] = " "
    path.write_text(json.dumps(meta))
    ds = get_dataset("coco", str(tmp_path), skip_bad=True)
    assert [r.group_id for r in ds.records("train", "text")] == ["1"] * 5
    assert [r.sample_id for r in ds.records("val", "text")] == ["30", "31", "32", "33"]
    assert [sid for sid, _ in ds.skipped] == ["2", "34"]


# ------------------------------------------------------------------ flickr30k


def test_flickr30k_karpathy(tmp_path, copy_png):
    images = []
    for i, (stem, split) in enumerate(
        [("1000092795", "train"), ("200", "val"), ("30", "test"), ("31", "test")]
    ):
        copy_png(tmp_path / "flickr30k-images" / f"{stem}.jpg", i)
        sents = [{"raw": c, "sentid": i * 5 + k} for k, c in enumerate(_caps(i))]
        images.append({"filename": f"{stem}.jpg", "split": split, "imgid": i, "sentences": sents})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    ds = get_dataset("flickr30k", str(tmp_path))
    assert [r.group_id for r in ds.records("test", "image")] == ["30", "31"]
    assert Counter(r.group_id for r in ds.records("test", "text")) == {"30": 5, "31": 5}
    assert ds.records("train", "image")[0].payload == str(tmp_path / "flickr30k-images" / "1000092795.jpg")
    _check_contract(ds)
    (tmp_path / "flickr30k-images").rename(tmp_path / "images")
    assert (
        get_dataset("flickr30k", str(tmp_path)).records("val", "image")[0].payload.endswith("images/200.jpg")
    )


# ------------------------------------------------------------------ jsonl


def _write_pairs(root: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_jsonl_captions_splits_audio(tmp_path, copy_png, tuxpaint_root):
    copy_png(tmp_path / "img" / "a.png")
    copy_png(tmp_path / "img" / "b.png", 1)
    ogg = next(iter(sorted(tuxpaint_root.rglob("*.ogg"))))
    (tmp_path / "snd.ogg").write_bytes(ogg.read_bytes())
    rows = [
        {"id": "a", "image": "img/a.png", "caption": ["One.", "Two."], "split": "test"},
        {"id": "b", "image": "img/b.png", "caption": "Bee.", "split": "train"},
        {"id": "s", "audio": "snd.ogg", "caption": "A sound.", "split": "train"},
        "",
    ]
    ds = get_dataset("jsonl", str(_write_pairs(tmp_path, rows)))
    assert ds.modalities() == ["image", "text", "audio"]
    assert [(r.sample_id, r.payload) for r in ds.records("test", "text")] == [
        ("a#0", "One."),
        ("a#1", "Two."),
    ]
    assert [r.sample_id for r in ds.records("train", "text")] == ["b#0", "s#0"]
    assert ds.records("train", "audio")[0].payload == str(tmp_path / "snd.ogg")
    assert ds.records("val", "image") == []


def test_jsonl_seeded_split_without_split_field(tmp_path, copy_png):
    copy_png(tmp_path / "x.png")
    rows = [{"id": f"item{i}", "image": "x.png", "caption": f"Caption {i}."} for i in range(200)]
    _write_pairs(tmp_path, rows)
    ds = get_dataset("jsonl", str(tmp_path), seed=3)
    sizes = [len(ds.records(s, "image")) for s in SPLITS]
    assert sum(sizes) == 200 and sizes == [160, 20, 20]
    expected = split_groups({f"item{i}": f"item{i}" for i in range(200)}, seed=3)
    assert {r.group_id: s for s in SPLITS for r in ds.records(s, "image")} == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"image": "x.png", "caption": "c"}', "'id'"),
        ('{"id": "q", "caption": "c"}', "exactly one of 'image' or 'audio'"),
        ('{"id": "q", "image": "x.png", "caption": 3}', "'caption' must be"),
        ('{"id": "q", "image": "x.png", "caption": "c", "split": "dev"}', "'split' must be"),
        ('{"id": "ok", "image": "x.png", "caption": "again"}', "already used on line 1"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, copy_png, line, message):
    copy_png(tmp_path / "x.png")
    _write_pairs(tmp_path, [{"id": "ok", "image": "x.png", "caption": "fine"}, line])
    with pytest.raises(DatasetError, match=rf"pairs\.jsonl:2: .*{message}"):
        get_dataset("jsonl", str(tmp_path))


def test_jsonl_path_escape_and_empty_caption(tmp_path, copy_png):
    copy_png(tmp_path / "x.png")
    escape = {"id": "evil", "image": "../../etc/passwd", "caption": "c", "split": "train"}
    _write_pairs(tmp_path, [{"id": "ok", "image": "x.png", "caption": "fine", "split": "train"}, escape])
    with pytest.raises(DatasetError, match="evil.*escapes the dataset root.*--skip-bad"):
        get_dataset("jsonl", str(tmp_path))
    ds = get_dataset("jsonl", str(tmp_path), skip_bad=True)
    assert [r.group_id for r in ds.records("train", "image")] == ["ok"]
    assert [sid for sid, _ in ds.skipped] == ["evil"]

    rows = [
        {"id": "ok", "image": "x.png", "caption": ["fine", "  "], "split": "val"},
        {"id": "blank", "image": "x.png", "caption": "", "split": "val"},
    ]
    _write_pairs(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"ok#1: pairs\.jsonl:1: caption 1 is empty"):
        get_dataset("jsonl", str(tmp_path))
    ds = get_dataset("jsonl", str(tmp_path), skip_bad=True)
    assert [r.sample_id for r in ds.records("val", "text")] == ["ok#0"]
    assert [r.group_id for r in ds.records("val", "image")] == ["ok"]  # "blank" lost its only caption
    assert [sid for sid, _ in ds.skipped] == ["ok#1", "blank#0", "blank"]


# ------------------------------------------------------------------ split function (property tests)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=6), st.integers(0, 4), max_size=60), st.integers(0, 2**32)
)
def test_split_groups_partitions_and_preserves_clusters(groups, seed):
    cluster_of = {g: f"c{c}" for g, c in groups.items()}
    split_of = split_groups(cluster_of, seed)
    assert set(split_of) == set(cluster_of) and set(split_of.values()) <= set(SPLITS)
    by_cluster = defaultdict(set)
    for g, s in split_of.items():
        by_cluster[cluster_of[g]].add(s)
    assert all(len(s) == 1 for s in by_cluster.values())
    # Input order does not matter.
    assert split_groups(dict(reversed(list(cluster_of.items()))), seed) == split_of


@settings(max_examples=15, deadline=None)
@given(st.integers(2000, 5000), st.integers(0, 2**32))
def test_assign_clusters_is_roughly_80_10_10(n, seed):
    out = assign_clusters({f"k{i}": 1 + i % 3 for i in range(n)}, seed)
    groups = Counter()
    for i in range(n):
        groups[out[f"k{i}"]] += 1 + i % 3
    total = sum(groups.values())
    for name, frac in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert abs(groups[name] / total - frac) < 0.01


def test_tuxpaint_trimodal_has_all_three_modalities_per_group_on_tuxpaint_split():
    full = get_dataset("tuxpaint")
    tri = get_dataset("tuxpaint-trimodal")
    assert tri.modalities() == ["image", "text", "audio"]
    for split in tri.splits():
        groups = [{r.group_id for r in tri.records(split, m)} for m in tri.modalities()]
        assert groups[0] == groups[1] == groups[2] and groups[0]
        assert groups[0] <= {r.group_id for r in full.records(split, "audio")}  # same side as in tuxpaint
    assert sum(len(tri.records(s, "audio")) for s in tri.splits()) == 131
