#!/usr/bin/env bash
# Issue 8: the chest X-ray model trained on children and adults of every source, and the
# leave-one-source-out (LOSO) runs behind its table. The exact commands; models go under
# $RUNS (default build/adult), logs beside them. Sections, run in this order:
#
#   scripts/adult_sources.sh train     # recipe A: candidate (teaching held out) and LOSO folds
#   scripts/adult_sources.sh variants  # recipe B (class- and source-balanced loss, more zoom)
#   scripts/adult_sources.sh loso-bal  # recipe B's LOSO folds (not run: B lost on validation)
#   scripts/adult_sources.sh size224   # recipe A at 224 px, one more candidate (shipped)
#   scripts/adult_sources.sh loso224   # its LOSO folds
#   scripts/adult_sources.sh lite2     # recipe A at 224 px on EfficientNet-Lite2 (probe winner)
#   scripts/adult_sources.sh lung224   # recipe A at 224 px with the thresholded lung crop
#   scripts/adult_sources.sh losolung  # its LOSO folds
#   scripts/adult_sources.sh serving   # calibration, operating point, abstention: each folder
#   scripts/adult_sources.sh evaluate  # an evaluation report per folder
#   scripts/adult_sources.sh table     # the LOSO table (docs/model_comparison.md)
#   scripts/adult_sources.sh ship      # the chosen candidate into ai/models/cxr, its report
#
# One recipe everywhere (RECIPE): only the source held out changes. The teaching set (licence
# unknown) is kept out of the shipped candidate, which holds it out as its unseen source (that is
# the teaching fold); the other LOSO folds train on it, since without it the only adult normals
# are NIH's and holding NIH out would leave none. A first run of the folds that excluded it gave
# specificity 0.02 on held-out NIH: with no adult normal in training, every adult is COVID-19.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/shared/data}
RUNS=${RUNS:-build/adult}
RECIPE=(--backbone efficientnet_lite0 --pretrained --image-size 128 --batch-size 16 --seed 0
    --epochs 3 --phase2-epochs 25 --patience 5
    --preprocess square,crop=0.8,mask_border=0.06,clahe
    --rotation 10 --shift 0.08 --zoom 0.12 --brightness 0.2 --contrast 0.3 --blur 1.0 --erase 0.3)
FOLDS=(hannover nih cohen figure1 kermany)
mkdir -p "$RUNS"

train() {  # train NAME [options...]
    local name=$1
    shift
    [[ -f "$RUNS/$name/model.json" ]] && { echo "== $name: trained already"; return; }
    echo "== $name: pacs-node train --task cxr --data $DATA --out $RUNS/$name ${RECIPE[*]} $*"
    nice -n 19 pacs-node train --task cxr --data "$DATA" --out "$RUNS/$name" --name "$name" \
        "${RECIPE[@]}" "$@" >"$RUNS/$name.log" 2>&1
    grep -o '"test_accuracy": [0-9.]*' "$RUNS/$name/training.json" || true
}

case "${1:-}" in
train)
    train cxr-all --hold-out-source teaching --version 0.3.0
    for s in "${FOLDS[@]}"; do
        train "loso-$s" --hold-out-source "$s"
    done
    ;;
size224)
    # the same recipe at 224 px (a 7x7 Grad-CAM map instead of 4x4), as one more candidate
    RECIPE=("${RECIPE[@]/128/224}")
    train cxr-all-224 --hold-out-source teaching --version 0.3.0
    ;;
loso224)
    # the LOSO folds of the 224 px recipe (the one shipped: it won on validation)
    RECIPE=("${RECIPE[@]/128/224}")
    for s in "${FOLDS[@]}"; do
        train "loso224-$s" --hold-out-source "$s"
    done
    ;;
lite2)
    # scripts/probe_backbones.py: frozen Lite2 features at 224 px had the best mean LOSO score
    # of the three Lite backbones; the same recipe, fine-tuned, to compare on validation.
    RECIPE=("${RECIPE[@]/128/224}")
    RECIPE=("${RECIPE[@]/efficientnet_lite0/efficientnet_lite2}")
    train cxr-lite2-224 --hold-out-source teaching --version 0.4.0
    ;;
lung224)
    # docs/model_comparison.md section I: the lung box (ai.preprocess.lung_box) gained about
    # 0.04 on the mean held-out rate with two seeds of the top-only fine-tune; the full recipe
    # at 224 px with it, the teaching set held out as for the shipped candidate. Rule, written
    # before it ran: it replaces cxr-all-224 if its validation macro-F1 is at least 0.851 (the
    # shipped 0.861 less 0.01: the crop's gain was on held-out sources, which validation cannot
    # show, so validation only guards against an in-distribution loss).
    RECIPE=("${RECIPE[@]/128/224}")
    RECIPE=("${RECIPE[@]/square,crop=0.8,mask_border/square,crop=0.8,lung_crop,mask_border}")
    train cxr-lung-224 --hold-out-source teaching --version 0.4.0
    ;;
losolung)
    # the LOSO folds of the lung-crop recipe, for the table (it won on validation: 0.853)
    RECIPE=("${RECIPE[@]/128/224}")
    RECIPE=("${RECIPE[@]/square,crop=0.8,mask_border/square,crop=0.8,lung_crop,mask_border}")
    for s in "${FOLDS[@]}"; do
        train "losolung-$s" --hold-out-source "$s"
    done
    ;;
variants)
    # Recipe B: the loss balanced by class and source (--balance source), and more zoom (the
    # teaching set is tightly cropped, the others are not).
    train cxr-all-bal --hold-out-source teaching --version 0.3.0 --balance source --zoom 0.2
    ;;
loso-bal)
    for s in "${FOLDS[@]}"; do
        train "loso-bal-$s" --hold-out-source "$s" --exclude-source teaching --balance source \
            --zoom 0.2
    done
    ;;
ship)
    # The candidate chosen on validation macro-F1 into ai/models/cxr under its release name, its
    # report into docs/model_reports. Rule, written before cxr-all-224 finished: recipe A at
    # 128 px (cxr-all, whose LOSO folds are run) unless 224 px beats its validation macro-F1 by
    # 0.02 or more. Recipe B (source-balanced loss) lost on validation (0.751 vs 0.759).
    # cxr-all-224 won: validation macro-F1 0.861 against 0.759.
    # cxr-lung-224 (0.4.0) replaced it by the lung224 rule: validation macro-F1 0.853.
    CHOSEN=${CHOSEN:-cxr-lung-224}
    VERSION=${VERSION:-0.4.0}
    rm -rf ai/models/cxr.new && mkdir ai/models/cxr.new
    cp "$RUNS/$CHOSEN"/{model.keras,training.json,serving.json,abstention.npz} ai/models/cxr.new/
    python - "$RUNS/$CHOSEN/model.json" "$VERSION" <<'PY'
import json, sys
from pathlib import Path
spec = json.loads(Path(sys.argv[1]).read_text())
spec.update(name="cxr-efficientnet-lite0", version=sys.argv[2])
Path("ai/models/cxr.new/model.json").write_text(json.dumps(spec, indent=2) + "\n")
PY
    cp ai/models/cxr/MODEL_CARD.md ai/models/cxr.new/ && rm -rf ai/models/cxr
    mv ai/models/cxr.new ai/models/cxr
    rm -rf docs/model_reports/cxr
    pacs-node evaluate ai/models/cxr --data "$DATA" --out docs/model_reports/cxr \
        --bootstrap 1000 --gradcam-images 12
    ;;
serving)
    for dir in "$RUNS"/*/; do
        pacs-node fit-serving "$dir" --data "$DATA" >>"$RUNS/$(basename "$dir").log" 2>&1
    done
    ;;
evaluate)
    for dir in "$RUNS"/*/; do
        pacs-node evaluate "$dir" --data "$DATA" --out "$dir/eval" --bootstrap 500 \
            --gradcam-images 12 >>"$RUNS/$(basename "$dir").log" 2>&1
        tail -n 1 "$RUNS/$(basename "$dir").log"
    done
    ;;
table)
    echo "128 px:"
    python scripts/loso_table.py "$RUNS/cxr-all" "$RUNS"/loso-hannover "$RUNS"/loso-nih \
        "$RUNS"/loso-cohen
    echo "224 px (0.3.0):"
    python scripts/loso_table.py "$RUNS/cxr-all-224" "$RUNS"/loso224-*
    echo "224 px, lung crop (shipped 0.4.0):"
    python scripts/loso_table.py docs/model_reports/cxr "$RUNS"/losolung-*
    ;;
*)
    sed -n "2,18p" "$0"
    exit 2
    ;;
esac
