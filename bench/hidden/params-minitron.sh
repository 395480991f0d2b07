export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/tmp/snap20
cd /tmp
/usr/bin/time -v /work/venv20/bin/python -m llmprune prune /root/.cache/llmprune/models/smollm2-135m-instruct --params 0.25 --hidden-method minitron --calib /work/shared/data/reference-train.txt --n-samples 32 --seq-len 256 --out /work/runs20/params-minitron --quiet
