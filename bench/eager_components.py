"""Per-component eager timings of the default model on this CPU (predictor, refiner, decoder, whole sample) at
batches 1 and 16, one thread, medians; run it alternately in two trees to compare them (BENCHMARKS.md, the
integrator A/B). ``BUNDLE=DIR`` times another bundle.

    .venv/bin/python bench/eager_components.py
"""
import json
import os
import statistics
import time

import torch

torch.set_num_threads(1)
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.models import refiner_takes_dt
s = Sampler.from_bundle(os.environ.get("BUNDLE"), device="cpu")
p = s.pipeline
sch = s.default_schedule("H1P5R3")
C,H,W = p.latent_shape
def bench(fn, n=40, warm=5):
    for _ in range(warm): fn()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return 1000*statistics.median(ts)
out={}
with torch.inference_mode():
  for B in (1,16):
    x=torch.randn(2*B,C,H,W); t=torch.full((2*B,),0.3); y=torch.randint(0,10,(2*B,))
    v=torch.randn(2*B,C,H,W)
    out[f"pred{B}"]=bench(lambda: p.predictor(x,t,y))
    try:
        age = (torch.full_like(t, 0.1),) if refiner_takes_dt(p.refiner) else ()  # dt-conditioned refiners: dt too
        out[f"ref{B}"]=bench(lambda: p.refiner(x,t,y,v,*age))
    except Exception as e: out[f"ref{B}"]=str(e)[:50]
    z=torch.randn(B,C,H,W)
    out[f"dec{B}"]=bench(lambda: p.decoder.decode(z))
    out[f"sample{B}"]=bench(lambda: s.sample([i % 10 for i in range(B)], schedule=sch, seed=0, progress=False), n=15, warm=3)
print(json.dumps({k:(round(v,3) if isinstance(v,float) else v) for k,v in out.items()}))
