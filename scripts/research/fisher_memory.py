"""Peak RSS of the output-Fisher pass on SmolLM2-135M, 8 windows of 512 tokens (BENCHMARKS, issue 23).

    python scripts/research/fisher_memory.py TAG
"""
import resource, sys, time, torch, llmprune
from llmprune.arch import get_adapter
from llmprune.calibration.fisher import output_fisher
from llmprune.calibration.calibrate import calibration_batches, read_calibration_text
torch.set_num_threads(1)
m, tok = llmprune.load_model("/root/.cache/llmprune/models/smollm2-135m-instruct")
b = torch.cat(calibration_batches(tok, read_calibration_text("/work/shared/data/reference-train.txt"), 8, 512, 0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.time(); output_fisher(m, get_adapter(m), [b]); 
print(sys.argv[1], "rss before pass %.0f MB, peak %.0f MB, %.0f s" % (base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.time() - t))
