#!/usr/bin/env bash
# Rebuild the bundled demo model from nothing: data, three training stages, bundle, held-out evaluation.
# About an hour on 2 CPU cores, 60 minutes of it training (see the model card). Run from anywhere;
# everything is written under training/demo/work/.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p work
videoxl2 make-data work/clips --videos 3000 --seed 6 --frames-min 4 --frames-max 4 --multi-turn --matching 3000
videoxl2 make-data work/videos --videos 2500 --seed 11 --frames-min 8 --frames-max 96 --multi-turn --every-needle
videoxl2 make-data work/videos2 --videos 1500 --seed 13 --frames-min 8 --frames-max 96 --multi-turn --every-needle
videoxl2 make-data work/heldout --videos 60 --seed 12345 --frames-min 8 --frames-max 96 --split test
videoxl2 train --config stage1.yaml
videoxl2 train --config stage2.yaml
videoxl2 train --config stage3.yaml
python bundle.py work/stage3 work/bundle
for mode in dense bilevel; do
  videoxl2 eval synthetic --model work/bundle --data-root work/heldout --out "work/eval-$mode" --mode "$mode" --limit 200
done
