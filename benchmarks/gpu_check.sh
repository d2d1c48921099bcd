#!/usr/bin/env bash
# GPU check: every training command on 1 GPU and (when there are 2+) on 2 GPUs under torchrun, with img/s.
#
#   benchmarks/gpu_check.sh                 # demo cfg + a synthetic dataset, 2 epochs per command
#   CFG=my.cfg DATA=my.data EPOCHS=3 IMG=416 BATCH=32 benchmarks/gpu_check.sh
#   OUT=/tmp/gpu-check PYTHON=.venv/bin/python benchmarks/gpu_check.sh
#
# Runs: train --amp, sparse-train, distill (teacher = the trained model) and quantize --epochs (QAT), each
# first with --device 0, then with `torchrun --standalone --nproc_per_node 2 ... --device 0,1` (plus train and
# QAT with --sync-bn on 2 GPUs).
# img/s = training images x epochs / wall seconds of the whole command (start-up, evaluation and saving
# included, so it understates the loop's own speed; the same for every row). world_size is the one the
# command wrote in its report.json ("-" where the command does not report it).
# Fails with exit 1 and a one-line reason on a machine without CUDA. Logs: $OUT/logs/<row>.log.
# Last row (issue 15): the data pipeline feeding one GPU, yolov4-tiny at 416 on COCO128's real JPEGs (listed
# FEED_REPEAT=8 times) with full augmentation and 8 DataLoader workers; "data wait" is the share of the last
# epoch's training loop spent blocked on the DataLoader (goal <= 10%). Needs ../shared/assets (or ASSETS=).
# SCRIPT_CHECK=1 runs the same commands on the CPU (2 gloo processes) to test this script itself; its img/s
# mean nothing (the feed row only with FEED=1, e.g. FEED=1 FEED_REPEAT=1 EPOCHS=1 NTRAIN=32 IMG=64).
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/runs/gpu-check}
CFG=${CFG:-$ROOT/recipes/demo.cfg}
EPOCHS=${EPOCHS:-2}
IMG=${IMG:-256}
BATCH=${BATCH:-16}
NTRAIN=${NTRAIN:-512}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
DEV1=0 DEV2=0,1
if [[ "${SCRIPT_CHECK:-0}" == 1 ]]; then
    gpus=2 DEV1=cpu DEV2=cpu
elif [[ "$gpus" -lt 1 ]]; then
    echo "gpu_check: no CUDA device here ($("$PYTHON" -c 'import torch; print("torch", torch.__version__,
          "built with CUDA" if torch.backends.cuda.is_built() else "built without CUDA")')); run it on a CUDA machine" >&2
    exit 1
fi
if [[ -e "$OUT" ]]; then
    echo "gpu_check: $OUT exists; remove it or set OUT=another folder" >&2
    exit 1
fi
mkdir -p "$OUT/logs"
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: " +
              (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"))'

if [[ -z "${DATA:-}" ]]; then
    "$PYTHON" -m compress data synth --out "$OUT/data" --n-train "$NTRAIN" --n-valid 64 --img-size "$IMG" \
        > "$OUT/logs/data.log"
    DATA=$OUT/data/synth.data
fi
train_images=$("$PYTHON" -c 'import sys; from compress.data.dataset import load_data_spec
print(len(load_data_spec(sys.argv[1]).train))' "$DATA")

ROWS=()
# run ROW NPROC DEVICE ARGS...: one command, timed; appends "row | gpus | img/s | world_size | wall s" to ROWS.
run() {
    local row=$1 nproc=$2 device=$3; shift 3
    local launch=("$PYTHON" -m compress)
    [[ "$nproc" -gt 1 ]] && launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc"
                                    -m compress)
    local out="$OUT/$row" start end
    start=$(date +%s%N)
    if ! "${launch[@]}" "$@" --out "$out" --device "$device" > "$OUT/logs/$row.log" 2>&1; then
        echo "gpu_check: $row failed; the end of $OUT/logs/$row.log:" >&2
        tail -n 20 "$OUT/logs/$row.log" >&2
        exit 1
    fi
    end=$(date +%s%N)
    ROWS+=("$("$PYTHON" - "$row" "$nproc" "$train_images" "$EPOCHS" "$start" "$end" "$out/report.json" <<'PY'
import csv, json, pathlib, sys
row, nproc, images, epochs, start, end, report = sys.argv[1:]
wall = (int(end) - int(start)) / 1e9
try:
    rep = json.load(open(report))
except (OSError, ValueError):
    rep = {}
world = rep.get("world_size", "-")
wait = None  # the last epoch's data_wait (workers are warm by then), from the run's results.csv
for csv_path in sorted(pathlib.Path(report).parent.rglob("results.csv")):
    rows = list(csv.DictReader(open(csv_path)))
    wait = rows[-1].get("data_wait") if rows else None
    break
wait = "-" if not wait else f"{100 * float(wait):.1f}%"
print(f"{row:<22} {nproc:>5} {int(images) * int(epochs) / wall:10.1f} {world!s:>11} {wall:8.1f} {wait:>10}")
PY
)")
}

COMMON=(--data "$DATA" --epochs "$EPOCHS" --img-size "$IMG" --batch-size "$BATCH")
for nproc in 1 2; do
    if [[ "$nproc" -gt "$gpus" ]]; then
        ROWS+=("$(printf '%-22s %5s %10s' "(all commands)" "$nproc" "skipped: only $gpus GPU")")
        continue
    fi
    device=$([[ "$nproc" -eq 1 ]] && echo "$DEV1" || echo "$DEV2")
    run "train-amp-$nproc" "$nproc" "$device" train --cfg "$CFG" "${COMMON[@]}" --amp
    teacher=$OUT/train-amp-$nproc
    run "sparse-train-$nproc" "$nproc" "$device" sparse-train --cfg "$CFG" "${COMMON[@]}" --sr 0.001  # not --s: torchrun would take it for its own --s...
    run "distill-$nproc" "$nproc" "$device" distill --cfg "$CFG" --t-cfg "$teacher/best.cfg" \
        --t-weights "$teacher/best.weights" "${COMMON[@]}"
    run "qat-$nproc" "$nproc" "$device" quantize --cfg "$teacher/best.cfg" --weights "$teacher/best.weights" \
        --data "$DATA" --epochs "$EPOCHS" --img-size "$IMG" --batch-size "$BATCH" --no-eval
    if [[ "$nproc" -gt 1 ]]; then  # SyncBatchNorm only means something across processes
        if [[ "${SCRIPT_CHECK:-0}" != 1 ]]; then  # torch's SyncBatchNorm is CUDA-only (refused on gloo)
            run "train-syncbn-$nproc" "$nproc" "$device" train --cfg "$CFG" "${COMMON[@]}" --sync-bn
        fi
        run "qat-syncbn-$nproc" "$nproc" "$device" quantize --cfg "$teacher/best.cfg" \
            --weights "$teacher/best.weights" --data "$DATA" --epochs "$EPOCHS" --img-size "$IMG" \
            --batch-size "$BATCH" --no-eval --sync-bn
    fi
done

# The data pipeline feeding one GPU (issue 15): yolov4-tiny at 416 on real JPEGs (COCO128 listed 8 times, so
# an epoch has 64 steps), full augmentation, 8 DataLoader workers; goal: data wait <= 10% of the last epoch.
ASSETS=${ASSETS:-${YOLO_COMPRESS_ASSETS:-$ROOT/../shared/assets}}
FEED_REPEAT=${FEED_REPEAT:-8}
if [[ -f "$ASSETS/weights/yolov4-tiny.cfg" && ( "${SCRIPT_CHECK:-0}" != 1 || "${FEED:-0}" == 1 ) ]]; then
    coco=$ASSETS/data/coco128
    mkdir -p "$OUT/feed-data"
    for _ in $(seq "$FEED_REPEAT"); do ls "$coco"/images/train2017/*.jpg; done > "$OUT/feed-data/train.txt"
    printf 'classes=80\ntrain=%s\nvalid=%s\nnames=%s\n' "$OUT/feed-data/train.txt" \
        "$coco/images/train2017" "$coco/coco.names" > "$OUT/feed-data/coco128x8.data"
    synth_images=$train_images train_images=$(wc -l < "$OUT/feed-data/train.txt")
    run "feed-v4tiny-416-8w" 1 "$DEV1" train --cfg "$ASSETS/weights/yolov4-tiny.cfg" \
        --weights "$ASSETS/weights/yolov4-tiny.weights" --data "$OUT/feed-data/coco128x8.data" --epochs "$EPOCHS" \
        --img-size 416 --batch-size 16 --workers 8 --amp
    train_images=$synth_images
else
    ROWS+=("$(printf '%-22s %5s %10s' "feed-v4tiny-416-8w" 1 "skipped: no $ASSETS (or SCRIPT_CHECK without FEED=1)")")
fi

printf '\n%-22s %5s %10s %11s %8s %10s\n' "command" "gpus" "img/s" "world_size" "wall s" "data wait"
printf '%s\n' "${ROWS[@]}"
echo "(other rows: $train_images training images x $EPOCHS epochs at $IMG px, batch $BATCH; data wait = share of the"
echo " last epoch's training loop blocked on the DataLoader; logs in $OUT/logs)"
