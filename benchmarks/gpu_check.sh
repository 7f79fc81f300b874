#!/usr/bin/env bash
# The GPU paths in one short script (under 5 minutes on one GPU): host syncs per step, the NCCL path of torchrun
# with one process (DDP and FSDP2), bf16, LoRA and torch.compile on the fashion-mnist preset, and the memory
# benchmark on CUDA. Writes its results as markdown to ${OUT:-runs/gpu-check}/gpu_check.md, to paste into
# docs/benchmarks.md. Run from the repository root, with the package installed: bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
PY=${PYTHON:-python}
{
  echo "## GPU check (\`benchmarks/gpu_check.sh\`), $(date -u +%Y-%m-%d)"
  echo
  echo '```text'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo '```'
  echo
  echo "### Host syncs per step (torch.cuda.set_sync_debug_mode)"
  echo
  echo '```text'
  $PY benchmarks/gpu_syncs.py --steps 10
  $PY benchmarks/gpu_syncs.py --steps 10 precision=bf16
  $PY benchmarks/gpu_syncs.py --steps 10 lora_rank=16
  echo '```'
  echo
  echo "### Distillation, 100 steps of the fashion-mnist preset: seconds per step (median) and final metrics"
  echo
  echo "| run | s/step | fd | recall |"
  echo "|---|--:|--:|--:|"
} > "$REPORT"
row() {  # name, then distill options; one process under torchrun (NCCL)
  local name=$1; shift
  rm -rf "$OUT/$name"
  $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m dibregman distill --preset fashion-mnist \
      --device cuda --steps 100 --eval-every 100 --checkpoint-every 50 --no-progress --out "$OUT/$name" "$@" \
      > "$OUT/$name.log" 2>&1 || { echo "| $name | failed: see $name.log | | |" >> "$REPORT"; return; }
  $PY - "$OUT/$name" "$name" >> "$REPORT" <<'PYEOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
m = s["metrics"]
print(f"| {sys.argv[2]} | {s['step_time_s']:.4f} | {m.get('fd', float('nan')):.3f} | {m.get('recall', float('nan')):.3f} |")
PYEOF
}
row ddp-fp32
row ddp-bf16 --precision bf16
row fsdp-fp32 --parallel fsdp
row fsdp-bf16 --parallel fsdp --precision bf16
row lora16 --lora-rank 16
row compile --compile true
{
  echo
  echo "### Memory (benchmarks/memory.py --device cuda)"
  echo
} >> "$REPORT"
$PY benchmarks/memory.py --device cuda --steps 5 --ranks 16 --precisions fp32,bf16 --batch-sizes 32 \
    >> "$REPORT" 2> "$OUT/memory.log" || echo "memory benchmark failed: see memory.log" >> "$REPORT"
cat "$REPORT"
