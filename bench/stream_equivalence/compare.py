import json, sys
from pathlib import Path
from safetensors.torch import load_file
import torch
a, b = Path(sys.argv[1]), Path(sys.argv[2])
pa, pb = json.loads((a/"llmprune_plan.json").read_text()), json.loads((b/"llmprune_plan.json").read_text())
print("same plan:", pa == pb)
def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")): out.update(load_file(str(f)))
    return out
ta, tb = tensors(a), tensors(b)
print("same keys:", ta.keys() == tb.keys(), len(ta))
diff = [k for k in ta if k in tb and not (ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]))]
print("bit-identical tensors:", not diff, "differing:", diff[:5])
if diff:
    print("max abs diff:", max(float((ta[k].float()-tb[k].float()).abs().max()) for k in diff if ta[k].shape == tb[k].shape))
