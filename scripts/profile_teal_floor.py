"""TEAL sequential=True calibration at 1 thread: where its time goes, and the floor (one forward pass over
128 x 256 tokens; histogramming every distinct target input once) against the former implementation.
Measurement script behind the TEAL-floor paragraph of BENCHMARKS.md (log: bench/calib_speed/teal_floor.log,
numbers: bench/calib_speed/teal_floor.json). Run from the repository root with PYTHONPATH=$PWD and
LLMPRUNE_SHARED set:

    taskset -c 0 python scripts/profile_teal_floor.py > bench/calib_speed/teal_floor.log
"""
import sys, time, torch, cProfile, pstats, io, json, os  # noqa: E401
sys.argv=['x']
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import bench_calib_speed as b
import teal_reference
from llmprune.sparsity import calibrate_activation_thresholds
from llmprune.sparsity import activation as A
from llmprune.calibration.calibrate import capture_layer_inputs, run_layer
from llmprune.arch import get_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
m=b.SHARED/"models"/"ref-llama-7m"
model=AutoModelForCausalLM.from_pretrained(str(m),dtype=torch.float32,use_kernels=False, trust_remote_code=False).eval()
tok=AutoTokenizer.from_pretrained(str(m), trust_remote_code=False)
batches=b.calibration_batches(tok,b.read_calibration_text(str(b.SHARED/"data"/"reference-train.txt")),128,256,seed=0)
print('batches',type(batches),len(batches), getattr(batches[0],'shape',None), flush=True)
res={'load_start':b.load_avg()}
def floor():
    with torch.no_grad():
        t=time.perf_counter()
        adapter=get_adapter(model); layers=adapter.decoder_layers(model)
        cap=capture_layer_inputs(model, adapter, batches); hidden=cap.hidden
        t_cap=time.perf_counter()-t
        dev=next(model.parameters()).device
        for i,layer in enumerate(layers):
            hidden=[run_layer(layer, hidden[j], *cap.layer_args[i][j], dev) for j in range(len(hidden))]
        t_layers=time.perf_counter()-t
        t=time.perf_counter()
        for x in batches: model(x)
        t_full=time.perf_counter()-t
    return t_cap, t_layers, t_full
def binning():
    # bin_counts of every distinct target input once (what any exact calibration must histogram)
    h=A.AbsHistogram(); inputs=[]
    hooks=[mod.register_forward_pre_hook(lambda mod,a: inputs.append(a[0].numel()) or None) for n,mod in model.named_modules() if n.endswith(('q_proj','o_proj','gate_proj','down_proj'))]
    tot=0.0
    def hk(mod,a):
        nonlocal tot
        t=time.perf_counter(); h.bin_counts(a[0]); tot+=time.perf_counter()-t
    for hd in hooks: hd.remove()
    hooks=[mod.register_forward_pre_hook(hk) for n,mod in model.named_modules() if n.endswith(('q_proj','o_proj','gate_proj','down_proj'))]
    with torch.no_grad():
        t=time.perf_counter()
        for x in batches: model(x)
        wall=time.perf_counter()-t
    for hd in hooks: hd.remove()
    return tot, wall
kw=dict(calibration=batches, sparsity=0.5, sequential=True, progress=False)
res['floor_1']=floor(); print('floor (capture, capture+layers, full model fwd)',res['floor_1'],flush=True)
res['binning']=binning(); print('binning (bin_counts s, fwd incl)',res['binning'],flush=True)
pr=cProfile.Profile(); t=time.perf_counter(); pr.enable(); new=calibrate_activation_thresholds(model,**kw); pr.disable(); res['new_prof']=time.perf_counter()-t
s=io.StringIO(); pstats.Stats(pr,stream=s).sort_stats('cumulative').print_stats(35); print(s.getvalue()[:7000]); 
s=io.StringIO(); pstats.Stats(pr,stream=s).sort_stats('tottime').print_stats(20); print(s.getvalue()[:5000], flush=True)
t=time.perf_counter(); new=calibrate_activation_thresholds(model,**kw); res['new']=time.perf_counter()-t; print('new',res['new'],flush=True)
t=time.perf_counter(); old=teal_reference.calibrate_activation_thresholds(model,**kw); res['old']=time.perf_counter()-t; print('old',res['old'],flush=True)
res['floor_2']=floor(); print('floor2',res['floor_2'])
t=time.perf_counter(); calibrate_activation_thresholds(model,**kw); res['new2']=time.perf_counter()-t; print('new2',res['new2'],flush=True)
res['load_end']=b.load_avg()
json.dump(res,open('bench/calib_speed/teal_floor.json','w'),indent=1); print(res)
