"""The paper's experiments as one pipeline: fetch images, pack, embed, train RecBole's baselines on
every target x baseline x seed (beside pre-training: they need the features, not the pre-trained
model), pre-train, re-learn every target x method x its grid points x seed, select on validation,
report.

    python -m ant_dist.reproduce --config configs/paper/ant.yaml --dry-run      (the plan, its estimate)
    python -m ant_dist.reproduce --config configs/paper/ant.yaml [--targets Scientific,Office] [--seeds 0]
    bash slurm/reproduce_paper.sh --config configs/paper/ant.yaml             (the same, as Slurm jobs)

Flags: --dry-run (print the stages, their dependencies, every command, the array size and the
resource estimate; run nothing), --targets A,B and --seeds 0,1 (override the config's lists),
--stages S,T (run only these stages), --parallel N (run up to N tasks of a stage at once),
--emit-slurm [DIR] (write the plan for slurm/reproduce_paper.sh and print DIR), --task STAGE:I
(run task I of a stage: what each Slurm job runs). Any other argument is a config option
(key=value, see below). The stages run in order on this machine; a task whose output exists is
skipped, so a rerun continues where the last one stopped (remove an output folder to redo it).
Selection: per (target, method, seed), the grid point (`relearn` options given as lists, e.g.
beta: [0.1, 0.3, 0.5, 0.7]) with the best validation `select_metric`; only those runs, and every
baseline run (`baselines`, with `baseline_options` and per target `baseline_target_options`), are
passed to `python -m ant_dist.report`. Every stage's timing is appended to <work_dir>/timings.jsonl.
Exit codes: 0 done, 2 bad configuration, otherwise the exit code of the failed command.
docs/reproduce.md has the data sources, the disk and time per stage, and the expected results.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ant_dist.config import ConfigError, ReproduceConfig, parse_cli
from ant_dist.features.feature_table import MANIFEST
from ant_dist.pipeline.launcher import launch_command
from ant_dist.pipeline.plan import Stage, Task, build_plan, layout, write_rated_meta
from ant_dist.pipeline.selection import report_inputs, select_runs
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ant_dist.runtime.processes import die_with_parent

PROG = "python -m ant_dist.reproduce"


# ----------------------------------------------------------------------------- command line
def split_flags(argv: list) -> tuple[dict, list]:
    """Our flags out of argv; the rest (--config, key=value, --help) goes to parse_cli."""
    flags = {"dry_run": False, "targets": None, "seeds": None, "stages": None, "parallel": 1, "emit": None,
             "task": None}
    rest, i = [], 0
    valued = {"--targets": "targets", "--seeds": "seeds", "--stages": "stages", "--parallel": "parallel",
              "--task": "task"}
    while i < len(argv):
        a = argv[i]
        if a == "--dry-run":
            flags["dry_run"] = True
        elif a == "--emit-slurm":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            takes = nxt is not None and not nxt.startswith("-") and "=" not in nxt
            flags["emit"] = nxt if takes else ""
            i += int(takes)
        elif a in valued:
            if i + 1 >= len(argv):
                usage(f"{a} needs a value")
            flags[valued[a]] = argv[i + 1]
            i += 1
        else:
            rest.append(a)
        i += 1
    return flags, rest


def usage(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def load(argv: list) -> tuple[ReproduceConfig, dict]:
    flags, rest = split_flags(argv)
    cfg = parse_cli(ReproduceConfig, rest, PROG, __doc__)
    if flags["targets"] is not None:
        cfg.targets = [t for t in flags["targets"].split(",") if t]
    if flags["seeds"] is not None:
        try:
            cfg.seeds = [int(s) for s in flags["seeds"].split(",") if s]
        except ValueError:
            usage(f"--seeds: integers separated by commas, got {flags['seeds']!r}")
    try:
        flags["parallel"] = max(1, int(flags["parallel"]))
    except ValueError:
        usage(f"--parallel: an integer, got {flags['parallel']!r}")
    return cfg, flags


# ----------------------------------------------------------------------------- showing the plan
def show_argv(argv: list) -> str:
    """A command as a user would type it: `python` for this interpreter."""
    return shlex.join(["python" if a == sys.executable else a for a in argv])


def print_plan(cfg: ReproduceConfig, stages: list, config_name: str) -> None:
    n_jobs = sum(len(s.tasks) for s in stages)
    print(f"plan for {config_name}: {len(stages)} stages, {n_jobs} jobs, working folder {cfg.work_dir}")
    width = max(len(s.name) for s in stages)  # embed_worddrop, pretrain_unisrec
    after_width = max(16, *(len(",".join(s.after)) for s in stages))
    print(f"{'stage':{width}s} {'jobs':>5s}  {'after':{after_width}s} {'slurm job':37s} {'resources per job':34s} "
          f"{'est. h/job':>10s} {'GPU-h':>8s} {'disk GB':>8s}")
    gpu_h = disk = 0.0
    finish: dict = {}  # per stage: hours from the start until it ends, all of an array's jobs at once
    for s in stages:
        r = s.resources
        kind = f"slurm/{s.launch}.sh" if s.launch else "slurm/reproduce_task.sh"
        shape = f"array 0-{len(s.tasks) - 1}" if len(s.tasks) > 1 else "1 job"
        res = f"{r['nodes']} node(s) x {r['gpus']} GPU, {r['cpus']} CPU" + (f", {r['mem']}" if r["mem"] else "")
        stage_gpu_h = len(s.tasks) * float(r["est_hours"]) * r["nodes"] * r["gpus"]
        gpu_h += stage_gpu_h
        finish[s.name] = float(r["est_hours"]) + max((finish.get(a, 0.0) for a in s.after), default=0.0)
        disk += float(r["est_disk_gb"])
        print(f"{s.name:{width}s} {len(s.tasks):5d}  {','.join(s.after) or '-':{after_width}s} {shape + ' ' + kind:37s} {res:34s} "
              f"{float(r['est_hours']):10.2f} {stage_gpu_h:8.1f} {float(r['est_disk_gb']):8.1f}")
    path_h = max(finish.values(), default=0.0)  # the longest chain of dependencies
    for name in ("baselines", "relearn"):
        note = next((s.note for s in stages if s.name == name), None)
        if note:
            print(f"{name} array: {note}")
    print(f"estimate (the config's resources.*.est_hours and est_disk_gb: extrapolations, docs/reproduce.md): "
          f"at most {gpu_h:.0f} GPU-hours (every job of an array as long as its longest), {path_h:.1f} h end to end "
          f"when all of an array's jobs run at once, {disk:.0f} GB of disk")
    for s in stages:
        print(f"\n[{s.name}] after: {', '.join(s.after) or 'nothing'}"
              + (f"; distributed: {s.resources['nodes']} node(s) x {s.resources['processes']} process(es)"
                 if s.launch else "") + (f"\n  {s.note}" if s.note else ""))
        for i, t in enumerate(s.tasks):
            print(f"  {i:4d} {t.label}: {show_argv(t.argv) if t.argv else '(in ant_dist.reproduce)'}")


# ----------------------------------------------------------------------------- running commands
def local_command(stage: Stage, task: Task) -> tuple[list, dict]:
    """The task's command on this machine: `accelerate launch` for a distributed stage with
    several processes (on CPU when there is no GPU), the command itself otherwise."""
    env = dict(os.environ)
    procs = int(stage.resources["processes"])
    if not stage.launch or procs <= 1:
        return task.argv, env
    return launch_command(task.argv[1:], procs, env=env)  # argv[1:]: "-m module ..."


def visible_gpus() -> list:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES, else every one torch sees)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_commands(commands: list, parallel: int, gpus: list = ()) -> int:
    """Run [(label, argv, env, on_exit)] with at most `parallel` at once (command k of the ones
    running at once gets GPU k mod len(gpus) when `gpus` are given); start no new one after a
    failure or a stop signal; SIGTERM/SIGUSR1 are passed on to the running commands (a training
    run checkpoints and exits 75). Returns 0, the first non-zero exit code, or 75 when stopped."""
    pending, running, first_error, stopping = list(commands), {}, 0, []
    free_slots = list(range(parallel))
    # runs in each child before exec: SIGTERM when we die (a launcher then stops its ranks)
    in_child = functools.partial(die_with_parent, os.getpid(), signal.SIGTERM)

    def forward(signum, _frame):
        stopping.append(signum)
        for proc, *_ in running.values():
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while pending or running:
            while pending and len(running) < parallel and not first_error and not stopping:
                label, argv, env, on_exit = pending.pop(0)
                slot = free_slots.pop(0)
                if gpus:
                    env = {**env, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
                print(f"$ {show_argv(argv)}", flush=True)
                proc = subprocess.Popen(argv, env=env, preexec_fn=in_child)
                running[proc.pid] = (proc, label, time.time(), on_exit, slot)
            if not running:
                break
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)  # block until a child ends; Popen reaps it
            for pid, (proc, label, started, on_exit, slot) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[pid]
                free_slots.append(slot)
                on_exit(proc.returncode, started)
                if proc.returncode != 0 and not first_error:
                    first_error = proc.returncode
                    print(f"{PROG}: {label} failed with exit code {proc.returncode}", file=sys.stderr)
    finally:
        for proc, *_ in running.values():  # only left here on an exception: leave no command behind
            proc.kill()
            proc.wait()
        for s, h in old.items():
            signal.signal(s, h)
    return first_error or (75 if stopping else 0)


def is_done(task: Task) -> bool:
    if not task.done_files and not task.done_tables:
        return False  # select and report always run: the runs may have changed
    for d in task.done_tables:
        try:
            if not json.loads((Path(d) / MANIFEST).read_text()).get("complete"):
                return False
        except (OSError, ValueError):
            return False
    return all(Path(f).exists() for f in task.done_files)


def record(cfg: ReproduceConfig, stage: str, index: int, label: str, started: float, code: Optional[int],
           skipped: bool = False) -> None:
    path = layout(cfg)["timings"]
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"stage": stage, "task": index, "label": label, "start": round(started, 3), "end": round(time.time(), 3),
           "seconds": round(time.time() - started, 3), "exit": code, "skipped": skipped, "host": socket.gethostname(),
           "slurm_job": os.environ.get("SLURM_JOB_ID")}
    with open(path, "a") as fh:  # one short line per write: appends from array tasks do not interleave
        fh.write(json.dumps(rec) + "\n")


def run_internal(cfg: ReproduceConfig, name: str) -> int:
    paths = layout(cfg)
    if name == "select":
        try:
            selection = select_runs(cfg)
        except ConfigError as exc:
            print(f"{PROG}: select: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        paths["selection"].parent.mkdir(parents=True, exist_ok=True)
        tmp = paths["selection"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(selection, indent=1) + "\n")
        os.replace(tmp, paths["selection"])
        for g in selection["groups"]:
            print(f"select: {g['target']} {g['method']} seed {g['seed']}: {g['selected']['point'] or 'the only run'} "
                  f"(valid {selection['select_metric']} {g['selected']['valid']:.4f})")
        print(f"select: {len(selection['groups'])} group(s) -> {paths['selection']}")
        return EXIT_OK
    from ant_dist.eval.report import main as report_main

    selection = json.loads(paths["selection"].read_text())
    try:  # the selected re-learning runs and every baseline run
        args = report_inputs(cfg, selection)
    except ConfigError as exc:
        print(f"{PROG}: report: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args += ["--out", str(paths["report"]), "--alpha", str(cfg.alpha)]
    if cfg.report_metrics:
        args += ["--metrics", cfg.report_metrics]
    print(f"$ python -m ant_dist.report {shlex.join(args)}", flush=True)
    return report_main(args)


def run_stage(cfg: ReproduceConfig, stage: Stage, parallel: int, only: Optional[int] = None) -> int:
    commands = []
    for i, task in enumerate(stage.tasks):
        if only is not None and i != only:
            continue
        if is_done(task):
            print(f"[{stage.name}] {task.label}: done already (output exists), skipped")
            record(cfg, stage.name, i, task.label, time.time(), 0, skipped=True)
            continue
        if task.action:
            started = time.time()
            code = run_internal(cfg, task.action)
            record(cfg, stage.name, i, task.label, started, code)
            if code:
                return code
            continue
        if task.before == "rated_meta" and not Path(task.info["out"]).is_file():
            from ant_dist.data.raw_readers import InputError

            try:
                write_rated_meta(task.info["meta"], task.info["ratings"], task.info["out"], task.info["min_ratings"])
            except (InputError, OSError) as exc:  # a missing or unreadable raw file
                print(f"{PROG}: {task.label}: {exc}", file=sys.stderr)
                record(cfg, stage.name, i, task.label, time.time(), EXIT_BAD_INPUT)
                return EXIT_BAD_INPUT
        argv, env = local_command(stage, task)
        commands.append((task.label, argv, env,
                         lambda code, started, i=i, t=task: record(cfg, stage.name, i, t.label, started, code)))
    if not commands:
        return EXIT_OK
    # several single-process runs at once: one GPU each (a distributed stage takes them all)
    gpus = visible_gpus() if parallel > 1 and len(commands) > 1 and not stage.launch else []
    return run_commands(commands, parallel, gpus)


def run_local(cfg: ReproduceConfig, stages: list, flags: dict) -> int:
    wanted = flags["stages"].split(",") if flags["stages"] else [s.name for s in stages]
    unknown = sorted(set(wanted) - {s.name for s in stages})
    if unknown:
        usage(f"--stages: unknown stage(s) {unknown}; stages: {[s.name for s in stages]}")
    t0 = time.time()
    for n, stage in enumerate(s for s in stages if s.name in wanted):
        started = time.time()
        print(f"\n[{stage.name}] {len(stage.tasks)} job(s)" + (f": {stage.note}" if stage.note else ""), flush=True)
        code = run_stage(cfg, stage, flags["parallel"])
        print(f"[{stage.name}] {'finished' if code == 0 else f'FAILED (exit {code})'} in {time.time() - started:.1f}s",
              flush=True)
        if code:
            return code
    print(f"\nreproduction done in {time.time() - t0:.0f}s: report {layout(cfg)['report'] / 'report.md'}, "
          f"selection {layout(cfg)['selection']}, timings {layout(cfg)['timings']}")
    return EXIT_OK


# ----------------------------------------------------------------------------- Slurm hand-off
def emit_slurm(cfg: ReproduceConfig, stages: list, out: str) -> Path:
    """What slurm/reproduce_paper.sh submits: config.yaml (the resolved config every job reloads),
    stages.tsv (one line per stage), <stage>.args (the key=value arguments of a distributed stage)."""
    folder = Path(out) if out else layout(cfg)["work"] / "slurm" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    lines = []
    for s in stages:
        r = s.resources
        done = int(all(is_done(t) for t in s.tasks))
        fields = [s.name, s.launch or "task", str(len(s.tasks)), ",".join(s.after) or "-", str(done), str(r["nodes"]),
                  str(r["gpus"]), str(r["processes"]), str(r["cpus"]), r["mem"] or "-", r["time"] or "-",
                  r["partition"] or "-"]
        lines.append("\t".join(fields))
        if s.launch:
            args = s.tasks[0].argv[5:]  # after: python -m module --config FILE
            if any("\n" in a for a in args):
                raise ConfigError(f"{s.name}: an option holds a line break")
            (folder / f"{s.name}.args").write_text("".join(a + "\n" for a in args))
            (folder / f"{s.name}.config").write_text(s.tasks[0].argv[4] + "\n")
    (folder / "stages.tsv").write_text("\n".join(lines) + "\n")
    return folder


def run_task(cfg: ReproduceConfig, stages: list, spec: str) -> int:
    """One Slurm job's work: task I of a stage, e.g. relearn:17."""
    name, _, index = spec.partition(":")
    stage = next((s for s in stages if s.name == name), None)
    if stage is None or not index.isdigit() or int(index) >= len(stage.tasks):
        usage(f"--task: STAGE:INDEX with a stage of {[s.name for s in stages]} and an index below its job count, "
              f"got {spec!r}")
    print(f"[{name}] task {index}: {stage.tasks[int(index)].label}", flush=True)
    return run_stage(cfg, stage, 1, only=int(index))


def main(argv: Optional[list] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cfg, flags = load(args)
    try:
        stages = build_plan(cfg)
        if flags["emit"] is not None:
            print(emit_slurm(cfg, stages, flags["emit"]).resolve())
            return EXIT_OK
    except ConfigError as exc:
        usage(f"config error: {exc}")
    config_name = args[args.index("--config") + 1] if "--config" in args[:-1] else "the default config"
    if flags["dry_run"]:
        try:
            print_plan(cfg, stages, config_name)
        except BrokenPipeError:  # `--dry-run | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    if flags["task"]:
        return run_task(cfg, stages, flags["task"])
    return run_local(cfg, stages, flags)


if __name__ == "__main__":
    sys.exit(main())
