"""Research prototype behind BENCHMARKS.md's real-model ablations (issue 23): Fisher-weighted structured OBS with
global allocation and a sequential refit, written outside the library to try variants fast. The library's
version is llmprune/structured/obs.py + llmprune/calibration/fisher.py (method obs, allocation fisher).

    python scripts/research/run_obs_prototype.py TAG '{"heads": 0.25, "ffn": 0.25, "mode": "query", "joint": 0.25}'

Options (JSON): heads, ffn, mode (query/group), fisher (bool), joint (false, or a fraction of block params),
nf (Fisher windows), n / seq (calibration windows), damp, protect (layers left alone), uniform.
"""
import sys, json, time, torch, os
os.environ.setdefault("HF_HUB_OFFLINE","1"); os.environ.setdefault("TOKENIZERS_PARALLELISM","false")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from obs_prototype import *
from llmprune import load_model
from llmprune.eval.perplexity import perplexity
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from real_model import real_model_path
M=str(real_model_path())
CAL=os.environ.get("LLMPRUNE_SHARED", "../shared") + "/data/reference-train.txt"
WT=open(os.environ.get("LLMPRUNE_SHARED", "../shared") + "/data/wikitext2-raw-test.txt").read()
def bp(model): return sum(p.numel() for n,p in model.named_parameters() if ".layers." in n)
def main(tag, o):
    model, tok = load_model(M, dtype="float32")
    adapter = get_adapter(model)
    bp0 = bp(model)
    batches = as_batches(CAL, tok, o.get("n", 64), o.get("seq", 256), 0, 8)
    t = time.time()
    mods, G, F = dense_stats(model, adapter, batches, fisher=o.get("fisher", True), n_fisher=o.get("nf"))
    t1 = time.time()
    hk, nk, hc, nc = allocate(model, adapter, mods, G, F, o["heads"], o["ffn"], o.get("mode","query"), o.get("fisher", True),
                              o.get("joint", False), percdamp=o.get("damp", 0.01), protect=tuple(o.get("protect", ())))
    if o.get("uniform"):
        L = len(hk); hk = [round(sum(hk)/L)]*L; nk=[round(sum(nk)/L)]*L
    t2 = time.time()
    Fs = {}
    for i, (om, dm) in enumerate(mods):
        Fs[("o", i)] = F[om]; Fs[("d", i)] = F[dm]
    del G
    sequential_prune(model, adapter, batches, hk, nk, o.get("mode","query"), Fs, o.get("damp",0.01), o.get("fisher", True))
    t3 = time.time()
    ppl = perplexity(model, tok, WT, seq_len=512, max_tokens=20000, progress=False).ppl
    res = dict(tag=tag, o=o, removed=1-bp(model)/bp0, ppl=ppl, hk=hk, nk=nk, t_stats=t1-t, t_alloc=t2-t1, t_seq=t3-t2)
    print(json.dumps(res)); open(os.environ.get("OBS_RESULTS", "bench/real_structured/prototype.jsonl"),"a").write(json.dumps(res)+"\n")
if __name__=="__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
