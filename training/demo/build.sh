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
# Each stage trains as two ranks (torchrun, DDP over gloo), each with half the cores: a model this small trains
# faster that way than as one process using them all, with the same updates (docs/training.md, "CPU ranks").
# The configs' batch sizes are per rank.
threads=$(( $(nproc) > 2 ? $(nproc) / 2 : 1 ))
for stage in stage1 stage2 stage3; do
  OMP_NUM_THREADS=$threads torchrun --standalone --nproc_per_node 2 -m videoxl2.cli train --config "$stage.yaml"
done
python bundle.py work/stage3 work/bundle
for mode in dense bilevel; do
  videoxl2 eval synthetic --model work/bundle --data-root work/heldout --out "work/eval-$mode" --mode "$mode" --limit 200
done
