#!/usr/bin/env bash
# One prepared check on one GPU, in under 8 minutes: the test suite's `gpu` marks, the DINOv2 step (ViT-B/14 bf16:
# img/s and model FLOP utilisation, goal >= 0.45), the MAE step (ViT-B/16 bf16 img/s), FSDP against DDP on one
# GPU (train.parallel=fsdp over a 1-rank mesh), the pathology device-stage cost per tile, pathology embed tiles/s
# and canopy-map Mpx/s. Each piece runs under its own time limit; one JSON file gathers every piece's last JSON
# line (or its exit status and the tail of its errors), so one failure does not hide the rest.
#
#   benchmarks/gpu_check.sh [OUT.json]               # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu-smoke [OUT.json]   # the same pieces on CPU at tiny sizes (checks the script)
set -uo pipefail

mode=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    mode=cpu
    shift
fi
out="$(realpath -m "${1:-gpu_check.json}")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root" || exit 1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT  # our own temporary folder only
export FOUNDATION_CACHE="$work/cache"
start=$SECONDS

# step NAME SECONDS CMD...: stdout to $work/NAME.out, stderr to $work/NAME.err, wall seconds and status recorded
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" >&2
    timeout --kill-after=5 "$limit" "$@" >"$work/$name.out" 2>"$work/$name.err"
    echo $? >"$work/$name.rc"
    echo $((SECONDS - t0)) >"$work/$name.s"
    echo "   rc=$(cat "$work/$name.rc") in $(cat "$work/$name.s")s" >&2
}

if [[ $mode == gpu ]]; then
    step tests 90 python -m pytest -q -m gpu -p no:cacheprovider tests
    step ssl_step 70 python benchmarks/ssl_step.py --arch vit_base --patch 14 --batch 32 --device cuda \
        --dtype bf16 --repeats 5
    step mae_step 50 python benchmarks/mae_step.py --arch vit_base --batch 128 --device cuda --dtype bf16 \
        --only 2d --repeats 5
    step fsdp_run 85 python benchmarks/fsdp_run.py --device cuda --arch vit_base --img-size 224 --patch 14 \
        --n-local 2 --batch 32 --steps 12 --workers 4
    step pathology_tiles 60 python benchmarks/pathology_tiles.py --device cuda --tiles 96 --rounds 1
    step pathology_embed 60 python benchmarks/pathology_embed.py --device cuda --arch vit_base --slides 1 \
        --size 4096 3072 --batch-size 64 --workers 4 --threads 4 --repeats 1
    step canopy_map 60 python benchmarks/canopy_map.py --device cuda --parts throughput --size 2048 \
        --patch 16 --batch-size 32 --repeats 1
else  # every piece on CPU, sized to take seconds: proves the script and the pieces' CPU paths, measures nothing
    step tests 120 python -m pytest -q -m gpu -p no:cacheprovider tests/train/test_parallel.py
    step ssl_step 120 python benchmarks/ssl_step.py --arch vit_tiny --patch 16 --global-size 64 --local-size 32 \
        --n-local 2 --batch 2 --prototypes 256 --repeats 1 --device cpu --peak-tflops 1
    step mae_step 120 python benchmarks/mae_step.py --arch vit_tiny --batch 2 --decoder-dim 32 --decoder-depth 1 \
        --only 2d --repeats 1 --device cpu
    step fsdp_run 180 python benchmarks/fsdp_run.py --device cpu --steps 4
    step pathology_tiles 180 python benchmarks/pathology_tiles.py --device cpu --tiles 8 --rounds 1 --n-local 2 \
        --batch-size 4
    step pathology_embed 180 python benchmarks/pathology_embed.py --device cpu --slides 1 --size 2048 1536 \
        --batch-size 8 --repeats 1
    step canopy_map 180 python benchmarks/canopy_map.py --device cpu --parts throughput --size 256 --tile 128 \
        --overlap 32 --batch-size 4 --repeats 1
fi

python - "$work" "$out" "$mode" "$((SECONDS - start))" <<'EOF'
import json, pathlib, platform, sys, time

work, out, mode, total = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as e:  # the report is still written
    device, versions = f"unknown ({e})", {}
report = {"mode": mode, "device": device, "host": platform.node(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "total_s": total, **versions, "pieces": {}}
for rc_file in sorted(work.glob("*.rc"), key=lambda p: p.stat().st_mtime):
    name = rc_file.stem
    rc = int(rc_file.read_text())
    piece = {"rc": rc, "seconds": int((work / f"{name}.s").read_text())}
    lines = (work / f"{name}.out").read_text().splitlines()
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if results:
        piece["result"] = results[-1] if len(results) == 1 else results
    if name == "tests":
        piece["summary"] = lines[-1] if lines else ""
    if rc != 0:
        piece["error_tail"] = (work / f"{name}.err").read_text()[-2000:] + "\n".join(lines[-20:])
    report["pieces"][name] = piece
ssl = report["pieces"].get("ssl_step", {}).get("result")
if isinstance(ssl, dict) and mode == "gpu":
    report["goal_mfu_0.45_met"] = ssl.get("mfu") is not None and ssl["mfu"] >= 0.45
report["all_ok"] = all(p["rc"] == 0 for p in report["pieces"].values())
out.write_text(json.dumps(report, indent=2))
print(json.dumps({"written": str(out), "all_ok": report["all_ok"], "total_s": total}))
EOF
