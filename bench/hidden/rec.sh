export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/tmp/snap20
cd /tmp
/usr/bin/time -v /work/venv20/bin/python -m llmprune recover /work/runs20/$1 --data /work/shared/data/reference-train.txt --teacher /root/.cache/llmprune/models/smollm2-135m-instruct --steps 50 --batch-size 4 --seq-len 256 --eval-every 25 --eval-windows 8 --out /work/runs20/$1-rec --quiet
