"""rho = ||x - x0||^2 / sum_s eta_s^2 ||g_s||^2 along the default's run (benchmarks/results-screen-directed/README.md).

Runs only in the tree patched as that README says (the tuner keeps the sum there), without YF_SCREEN_DIRECTED, so
that the run is the default's: python rho_diag.py TASK SEED
"""
import sys, torch
from yellowfin.bench import runner
from yellowfin.bench.optimizers import get_optimizer_spec
from yellowfin.bench.tasks import get_task
task_name, seed = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
task = get_task(task_name)
spec = get_optimizer_spec("yellowfin")
box = {}
build = spec.build
def capture(params, lr=None):
    box["opt"] = build(params, lr); return box["opt"]
object.__setattr__(spec, "build", capture)
steps = task.default_steps if hasattr(task, "default_steps") else None
marks = set()
def progress(step, loss):
    opt = box["opt"]
    n = steps
    if step % max(1, n // 20) == 0 or step == n:
        disp = sum(float(((p.detach().double() - opt.state[p]["initial_param"].double()) ** 2).sum())
                   for g in opt.param_groups for p in g["params"] if p in opt.state)
        t = opt._tuners[0]
        print(step, "rho %.3f" % (disp / float(t.path_sq_sum)), "climb %.4f" % float(t.climb_avg),
              "eff %.3g" % (float(t.alpha) / (1 - float(t.mu))), "loss %.4f" % loss, flush=True)
runner.train_run(task, spec, seed, steps, progress=progress)
