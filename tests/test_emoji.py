"""The emoji dataset (three drawing styles, emojibase captions), SVG rendering, and tuxpaint-all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3jepa.data import get_dataset
from m3jepa.data.emoji import DEFAULT_ROOT, STYLES, Concept, build_captions, code_key
from m3jepa.data.records import DatasetError
from m3jepa.data.svg import render_svg

needs_rsvg = pytest.mark.skipif(shutil.which("rsvg-convert") is None,
                                reason="needs rsvg-convert: `apt-get install librsvg2-bin` (setup.sh)")

RED_SQUARE = ('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
              '<rect width="10" height="10" fill="#f00"/></svg>')
WIDE_BLUE = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 20 10">'
             '<rect width="20" height="10" fill="#00f"/></svg>')

# The miniature tree: 20 plain concepts, one spelt with FE0F by some packages, and three that are no concepts
N_PLAIN = 20
PLAIN = [f"1F{0x600 + i:03X}" for i in range(N_PLAIN)]


USER_CACHE = os.environ.get("XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def _svg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # rendered PNGs stay in this test's folder


def _user_cache(monkeypatch) -> None:
    """The real data's renders in the user's cache (set-up made them), not 1,906 new ones per test."""
    if USER_CACHE is None:
        monkeypatch.delenv("XDG_CACHE_HOME")
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", USER_CACHE)


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (64, 64), (*colour, 255)).save(path)


def _svg(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
                    f'<circle cx="36" cy="36" r="30" fill="{colour}"/></svg>')


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_emoji_tree(root: Path) -> Path:
    """emojibase data, two emoji-datasource packages and OpenMoji, laid out as setup.sh unpacks them."""
    base = [{"label": f"face number {i}", "hexcode": h, "group": 0, "tags": ["face", f"n{i}"]}
            for i, h in enumerate(PLAIN)]
    base[1]["tags"] = ["animal"]  # shared with concept 2: no keyword caption for either
    base[2]["tags"] = ["animal"]
    base[3]["tags"] = []  # the name alone
    base += [
        {"label": "smiling face", "hexcode": "263A", "group": 0, "tags": ["relaxed", "smile"]},
        {"label": "light skin tone", "hexcode": "1F3FB", "group": 2, "tags": ["skin"]},  # a component
        {"label": "regional indicator A", "hexcode": "1F1E6"},  # no group: a letter, not an emoji
        {"label": "nazar amulet", "hexcode": "1F9FF", "group": 7, "tags": ["charm"]},  # no Twitter image
    ]
    _write_json(root / "emojibase-data/en/data.json", base)
    codes = [*PLAIN, "263A-FE0F", "1F3FB", "1F1E6", "1F9FF"]  # emoji-datasource spells 263A with FE0F
    for k, style in enumerate(("google", "twitter")):
        entries = []
        for code in codes:
            drawn = not (style == "twitter" and code == "1F9FF")
            name = f"{code.lower()}.png"
            entries.append({"unified": code, "image": name, f"has_img_{style}": drawn})
            if drawn:
                _png(root / f"emoji-datasource-{style}/img/{style}/64/{name}", (200 * k, 100, 50))
        _write_json(root / f"emoji-datasource-{style}/emoji.json", entries)
    for code in [*PLAIN, "263A", "1F3FB", "1F1E6", "1F9FF"]:
        _svg(root / f"openmoji/color/svg/{code}.svg", "#fcea2b")
    return root


def _concept(group_id: str) -> str:
    return group_id.split("/")[0]


def _style(group_id: str) -> str:
    return group_id.split("/")[1]


# ---------------------------------------------------------------- ids and captions


def test_code_key_joins_spellings_with_and_without_fe0f():
    assert code_key("263A-FE0F") == code_key("263a") == "263A"
    assert code_key("0023-fe0f-20e3") == code_key("0023-20E3") == "0023-20E3"
    assert code_key("1F3F3-FE0F-200D-1F308") == "1F3F3-200D-1F308"


def test_captions_are_the_name_and_an_own_keyword_set():
    concepts = [
        Concept("1F600", "grinning face", ("face", "grin")),
        Concept("1F436", "dog face", ("animal",)),
        Concept("1F431", "cat face", ("animal",)),  # shares its keyword set with the dog: left out
        Concept("2693", "anchor", ("Anchor",)),  # the keyword set is the name again: left out
        Concept("1F6A7", "construction", ()),
    ]
    assert build_captions(concepts) == {
        "1F600": ["grinning face", "face, grin"],
        "1F436": ["dog face"],
        "1F431": ["cat face"],
        "2693": ["anchor"],
        "1F6A7": ["construction"],
    }


# ---------------------------------------------------------------- the loader on a miniature tree


@needs_rsvg
def test_concept_protocol_on_a_miniature_tree(tmp_path):
    root = make_emoji_tree(tmp_path / "emoji")
    ds = get_dataset("emoji", str(root), seed=0)
    images = {s: ds.records(s, "image") for s in ds.splits()}
    texts = {s: ds.records(s, "text") for s in ds.splits()}
    assert {s: len(r) for s, r in images.items()} == {"train": 51, "val": 6, "test": 6}
    assert {s: len(r) for s, r in texts.items()} == {"train": 96, "val": 9, "test": 12}
    concepts = {s: {_concept(r.group_id) for r in rs} for s, rs in images.items()}
    assert set().union(*concepts.values()) == {*PLAIN, "263A"}  # no component, letter or half-drawn emoji
    assert not concepts["test"] & concepts["train"] and not concepts["val"] & concepts["train"]
    for split, rs in images.items():  # every concept of a split with its three styles, one group each
        assert sorted(r.group_id for r in rs) == sorted(f"{c}/{s}" for c in concepts[split] for s in STYLES)
        assert all(r.sample_id == r.group_id for r in rs)
    by_group = {r.sample_id: r for rs in texts.values() for r in rs}
    assert [by_group[f"263A/{s}#{i}"].payload for s in STYLES for i in range(2)] == [
        "smiling face", "relaxed, smile"] * 3
    assert by_group["1F600/openmoji#1"].payload == "face, n0"
    assert "1F601/google#1" not in by_group and "1F603/google#1" not in by_group  # shared / no keywords
    assert all(r.group_id == r.sample_id.split("#")[0] for r in by_group.values())
    openmoji = next(r for rs in images.values() for r in rs if r.group_id == "263A/openmoji")
    assert Path(openmoji.payload).is_relative_to(tmp_path / "cache/m3jepa/svg")
    with Image.open(openmoji.payload) as im:
        assert im.size == (64, 64) and im.getpixel((32, 32)) == (0xFC, 0xEA, 0x2B, 255)


@needs_rsvg
@pytest.mark.parametrize("held_out", STYLES)
def test_style_protocol_tests_on_the_held_out_style_alone(tmp_path, held_out):
    root = make_emoji_tree(tmp_path / "emoji")
    ds = get_dataset(f"emoji-style-{held_out}", str(root), seed=0)
    groups = {s: [r.group_id for r in ds.records(s, "image")] for s in ds.splits()}
    assert {s: len(g) for s, g in groups.items()} == {"train": 38, "val": 4, "test": 21}
    assert {_style(g) for g in groups["test"]} == {held_out}
    assert {_concept(g) for g in groups["test"]} == {*PLAIN, "263A"}  # every concept, in the unseen style
    for split in ("train", "val"):
        assert {_style(g) for g in groups[split]} == set(STYLES) - {held_out}
    assert not {_concept(g) for g in groups["val"]} & {_concept(g) for g in groups["train"]}
    assert {r.group_id for r in ds.records("test", "text")} == set(groups["test"])


@needs_rsvg
def test_seed_changes_members_not_sizes_and_limit_keeps_whole_concepts(tmp_path):
    root = make_emoji_tree(tmp_path / "emoji")
    a, b = get_dataset("emoji", str(root), seed=0), get_dataset("emoji", str(root), seed=1)
    assert get_dataset("emoji", str(root), seed=0).records("test", "text") == a.records("test", "text")
    assert a.groups("test") != b.groups("test")
    small = get_dataset("emoji", str(root), seed=0, limit=6)
    # natural order: digit runs compare as numbers, so 1F60A (60, "A") sorts before 1F600 (600)
    assert small.groups("train") == [f"{c}/{s}" for c in ("1F60A", "1F60B") for s in sorted(STYLES)]


@needs_rsvg
def test_a_broken_svg_is_refused_or_skipped_with_its_group(tmp_path):
    root = make_emoji_tree(tmp_path / "emoji")
    (root / "openmoji/color/svg/1F605.svg").write_text("<svg")
    with pytest.raises(DatasetError, match=r"emoji: 1F605/openmoji: SVG .* cannot be rendered.*--skip-bad"):
        get_dataset("emoji", str(root))
    ds = get_dataset("emoji", str(root), skip_bad=True)
    assert [sid for sid, _ in ds.skipped] == ["1F605/openmoji"]
    groups = {r.group_id for s in ds.splits() for r in ds.records(s, "text")}
    assert "1F605/openmoji" not in groups and {"1F605/google", "1F605/twitter"} <= groups


def test_missing_data_and_missing_renderer_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="emoji: data folder .* not found; run `bash scripts/setup.sh`"):
        get_dataset("emoji", str(tmp_path / "nope"))
    root = make_emoji_tree(tmp_path / "emoji")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DatasetError, match="need rsvg-convert.*apt-get install librsvg2-bin"):
        get_dataset("emoji", str(root))


# ---------------------------------------------------------------- SVG rendering


@needs_rsvg
def test_render_svg_pixels_fit_and_content_addressed_cache(tmp_path):
    red = tmp_path / "red.svg"
    red.write_text(RED_SQUARE)
    out = render_svg(red, 8, cache=tmp_path / "c")
    with Image.open(out) as im:  # rsvg-convert writes RGB when no pixel is transparent
        assert im.size == (8, 8)
        assert (np.asarray(im.convert("RGBA")) == np.array([255, 0, 0, 255], dtype=np.uint8)).all()
    wide = tmp_path / "wide.svg"
    wide.write_text(WIDE_BLUE)
    with Image.open(render_svg(wide, 16, cache=tmp_path / "c")) as im:  # fitted into 16 x 16, aspect kept
        assert im.size == (16, 8) and im.convert("RGBA").getpixel((8, 4)) == (0, 0, 255, 255)
    stamp = out.stat().st_mtime_ns
    assert render_svg(red, 8, cache=tmp_path / "c") == out and out.stat().st_mtime_ns == stamp  # not redone
    red.write_text(RED_SQUARE.replace("#f00", "#0f0"))  # a changed SVG is a new file, rendered anew
    green = render_svg(red, 8, cache=tmp_path / "c")
    assert green != out
    with Image.open(green) as im:
        assert im.convert("RGBA").getpixel((4, 4)) == (0, 255, 0, 255)


# ---------------------------------------------------------------- tuxpaint-all


@needs_rsvg
def test_tuxpaint_all_adds_rendered_svg_stamps_and_tuxpaint_does_not(tmp_path):
    root = tmp_path / "stamps"
    for i in range(4):
        _png(root / f"animals/png{i}.png", (10 * i, 0, 0))
        (root / f"animals/png{i}.txt").write_text(f"A red thing {i}.\n")
    (root / "animals/drawn.svg").write_text(WIDE_BLUE)
    (root / "animals/drawn.txt").write_text("A blue band.\nfr.utf8=Une bande bleue.\n")
    plain, everything = get_dataset("tuxpaint", str(root)), get_dataset("tuxpaint-all", str(root))
    ids = {name: sorted(r.sample_id for s in d.splits() for r in d.records(s, "image"))
           for name, d in (("plain", plain), ("all", everything))}
    assert ids == {"plain": [f"animals/png{i}" for i in range(4)],
                   "all": ["animals/drawn", *(f"animals/png{i}" for i in range(4))]}
    drawn = next(r for s in everything.splits() for r in everything.records(s, "image")
                 if r.sample_id == "animals/drawn")
    with Image.open(drawn.payload) as im:
        assert im.size == (256, 128) and im.convert("RGBA").getpixel((128, 64)) == (0, 0, 255, 255)
    captions = {r.sample_id: r.payload for s in everything.splits() for r in everything.records(s, "text")}
    assert captions["animals/drawn"] == "A blue band."


# ---------------------------------------------------------------- the real installed data

real_emoji = pytest.mark.skipif(not Path(DEFAULT_ROOT, "emojibase-data/en/data.json").is_file(),
                                reason=f"needs the emoji packages in {DEFAULT_ROOT}: `bash scripts/setup.sh`")


@real_emoji
@needs_rsvg
def test_real_emoji_counts_for_both_protocols(monkeypatch):
    _user_cache(monkeypatch)
    ds = get_dataset("emoji", seed=0)
    assert {s: ds.counts()[s] for s in ds.splits()} == {
        "train": {"image": 4575, "text": 8922}, "val": {"image": 570, "text": 1110},
        "test": {"image": 573, "text": 1110}}
    concepts = {s: {_concept(g) for g in ds.groups(s)} for s in ds.splits()}
    assert [len(c) for c in concepts.values()] == [1525, 190, 191]
    assert not concepts["test"] & concepts["train"]
    style = get_dataset("emoji-style-openmoji", seed=0)
    assert {s: style.counts()[s] for s in style.splits()} == {
        "train": {"image": 3430, "text": 6688}, "val": {"image": 382, "text": 740},
        "test": {"image": 1906, "text": 3714}}
    assert {_style(g) for g in style.groups("test")} == {"openmoji"}
    assert "openmoji" not in {_style(g) for g in style.groups("train")}
    text = {r.sample_id: r.payload for r in ds.records("test", "text")}
    assert text["1F1E6-1F1FF/google#0"] == "flag: Azerbaijan"


@real_emoji
@needs_rsvg
@pytest.mark.slow
def test_encode_cli_on_real_emoji(tmp_path, monkeypatch):
    _user_cache(monkeypatch)
    args = [sys.executable, "-m", "m3jepa", "encode", "--dataset", "emoji", "--limit", "8",
            "--store-root", str(tmp_path / "stores"), "--workers", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from m3jepa.store import store_path
    from m3jepa.store.manifest import load_manifest, read_rows

    ds = get_dataset("emoji", limit=8)
    for split in ds.splits():
        for modality, encoder in (("image", "efficientnet-lite0"), ("text", "minilm-l6")):
            store = store_path(tmp_path / "stores", "emoji", split, modality, encoder)
            records = ds.records(split, modality)
            assert load_manifest(store).complete and load_manifest(store).rows == len(records)
            assert [r.sample_id for r in read_rows(store)] == [r.sample_id for r in records]
    assert len(ds.records("train", "image")) == 8


@needs_rsvg
def test_real_tuxpaint_all_adds_the_165_svg_stamps_and_tuxpaint_keeps_785(tuxpaint_root, monkeypatch):
    _user_cache(monkeypatch)
    plain, everything = get_dataset("tuxpaint", seed=0), get_dataset("tuxpaint-all", seed=0)
    assert [len(plain.records(s, "image")) for s in plain.splits()] == [628, 78, 79]  # the README's numbers
    assert [len(everything.records(s, "image")) for s in everything.splits()] == [760, 95, 95]
    assert [len(everything.records(s, "audio")) for s in everything.splits()] == [104, 18, 12]
    swallow = next(r for s in everything.splits() for r in everything.records(s, "image")
                   if r.sample_id == "animals/birds/swallow")  # an SVG-only stamp
    with Image.open(swallow.payload) as im:
        assert max(im.size) == 256
