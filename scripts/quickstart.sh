#!/usr/bin/env bash
# Set up, index a folder of photos, query it — on the embedded store.
# Usage: scripts/quickstart.sh [PHOTO_FOLDER] [QUERY]   (default: sample photos written to ./photos)
#
# With the default preset, auto: the paper's models (SAM ViT-H + CLIP ViT-L/14-336) where CUDA is
# available, the base ones (SAM ViT-B + CLIP ViT-B/16) on a CPU, when their checkpoints are cached or
# can be downloaded (the total size is printed before the download starts). Otherwise, and only here,
# it falls back to the untrained `tiny` preset, under a banner.
set -euo pipefail
cd "$(dirname "$0")/.."
photos="${1:-photos}"
text="${2:-a cat}"
[ -x .venv/bin/use-search ] || bash scripts/setup-venv.sh dev
if [ "$photos" = "photos" ] && [ ! -d photos ]; then .venv/bin/python scripts/sample_photos.py photos; fi

preset=()  # the configured preset (default auto)
# The SAM and CLIP that the preset picks on this machine (prints which preset and why).
read -r -a models < <(.venv/bin/python -c 'from use_search.config import Settings
from use_search.presets import preset_for
p = preset_for(Settings())
print(p.sam, p.clip)')
if ! .venv/bin/use-search weights verify "${models[@]}" >/dev/null 2>&1 \
   && ! .venv/bin/use-search weights fetch "${models[@]}"; then
  preset=(--preset tiny)
  cat >&2 <<'BANNER'

######################################################################################
#  The real weights are not here and cannot be downloaded (offline?).                 #
#  Falling back to the `tiny` preset: RANDOM, UNTRAINED networks. The run shows the   #
#  pipeline works; its masks and rankings mean nothing.                               #
#  To get real results on a connected machine:                                        #
#      .venv/bin/use-search weights fetch --preset auto                               #
######################################################################################

BANNER
fi
# Exit code 3: some files failed (each is listed) and the rest is indexed: still worth a query.
.venv/bin/use-search ${preset[@]+"${preset[@]}"} index "$photos" || [ $? -eq 3 ]
.venv/bin/use-search ${preset[@]+"${preset[@]}"} query "$text" -k 5 --save out/overlays
