"""Peak RSS of one greedy OBS column removal (the FFN neurons of one layer) on a random Gram matrix.

    OMP_NUM_THREADS=1 python scripts/research/obs_solve_memory.py 4096 1024     # n (FFN width), out (hidden)
"""
import sys, torch, threading, time
from llmprune.structured.obs import greedy_column_removal
def st(f):
    for l in open("/proc/self/status"):
        if l.startswith(f): return int(l.split()[1])/2**20
torch.set_num_threads(1)
n, out = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
x = torch.randn(4*n, n)
gram = (x.t() @ x).float(); del x
w = torch.randn(out, n)
fisher = torch.eye(out, dtype=torch.float64)
base = st("VmRSS")
t = time.time()
greedy_column_removal(w, gram, n // 4, fisher)
print(f"n={n} out={out} base {base:.2f} GB  peak {st('VmHWM'):.2f} GB  unit(n^2 f64)={n*n*8/2**30:.2f} GB  {time.time()-t:.0f}s")
