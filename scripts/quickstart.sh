#!/usr/bin/env bash
# Set up, index a folder of photos, query it — on the embedded store.
# Usage: scripts/quickstart.sh [PHOTO_FOLDER] [QUERY]   (default: sample photos written to ./photos)
#
# With the paper's real weights (SAM ViT-H + CLIP ViT-L/14-336) when they are cached or can be
# downloaded. Otherwise, and only here, it falls back to the untrained `tiny` preset, under a banner.
set -euo pipefail
cd "$(dirname "$0")/.."
photos="${1:-photos}"
text="${2:-a cat}"
[ -x .venv/bin/use-search ] || bash scripts/setup-venv.sh dev
if [ "$photos" = "photos" ] && [ ! -d photos ]; then .venv/bin/python scripts/sample_photos.py photos; fi

preset=paper
if ! .venv/bin/use-search weights verify sam_vit_h clip_vit_l14_336_openai >/dev/null 2>&1 \
   && ! .venv/bin/use-search weights fetch sam_vit_h clip_vit_l14_336_openai; then
  preset=tiny
  cat >&2 <<'BANNER'

######################################################################################
#  The real weights are not here and cannot be downloaded (offline?).                 #
#  Falling back to the `tiny` preset: RANDOM, UNTRAINED networks. The run shows the   #
#  pipeline works; its masks and rankings mean nothing.                               #
#  To get real results on a connected machine:                                        #
#      .venv/bin/use-search weights fetch --preset paper                              #
######################################################################################

BANNER
fi
# Exit code 3: some files failed (each is listed) and the rest is indexed: still worth a query.
.venv/bin/use-search --preset "$preset" index "$photos" || [ $? -eq 3 ]
.venv/bin/use-search --preset "$preset" query "$text" -k 5 --save out/overlays
