"""cProfile of the eager sampler on the default model at batch 1 (H1P5R3, one thread): Python calls per sample
and the 30 most called functions (BENCHMARKS.md, the integrator A/B).

    .venv/bin/python bench/eager_call_profile.py
"""
import cProfile
import io
import pstats

import torch

torch.set_num_threads(1)
from flowturbo.runtime.sampler import Sampler
s = Sampler.from_bundle(device="cpu")
sch = s.default_schedule("H1P5R3")
for _ in range(3): s.sample([3], schedule=sch, seed=0)
pr=cProfile.Profile(); pr.enable()
for _ in range(5): s.sample([3], schedule=sch, seed=0)
pr.disable()
st=pstats.Stats(pr)
print("total calls per sample", st.total_calls/5)
out=io.StringIO(); pstats.Stats(pr, stream=out).sort_stats("ncalls").print_stats(30); print(out.getvalue()[:6000])
