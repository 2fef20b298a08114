set -x
nvidia-smi --query-gpu=name --format=csv,noheader
export VISIONOPS_TEST_CUDA=1
python -c "import visionops, torch; print(visionops.build_info() if callable(visionops.build_info) else '', torch.cuda.is_available())"
timeout 300 python -m pytest tests/test_roi_align.py tests/test_roi_pool.py -q -x -k "cuda or triton" -p no:cacheprovider 2>&1 | tail -25
cat > /tmp/gb.py <<'PY'
import torch, time
from visionops.bench.cases.roi import CASES
def t(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); torch.cuda.synchronize(); ts.append(time.perf_counter()-s)
    return sorted(ts)[n//2]*1e3
for c in CASES:
    if "cuda" not in c.devices: continue
    try:
        ours, base, check = c.make(torch.device("cuda"))
        check(ours(), base())
        a, b = t(ours), t(base)
        print(f"{c.op:10s} {c.name:40s} ours {a:8.3f} ms  {c.baseline} {b:8.3f} ms  ratio {b/a:6.2f}", flush=True)
    except Exception as e:
        print("FAIL", c.op, c.name, type(e).__name__, str(e)[:300], flush=True)
PY
timeout 200 python /tmp/gb.py
