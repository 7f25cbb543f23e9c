"""``lass-sparse experiment run|report|publish|plan CONFIG`` and ``lass-sparse demo``: parsers
and handlers; the work is in :mod:`.runner`, :mod:`.report` and :mod:`.publish`."""

from __future__ import annotations

import json
import os

from ...cli import CommandError, nonneg_int, positive_float, positive_int


def _config(args):
    from .config import load

    sets = list(args.set or [])
    if getattr(args, "corpus", None):
        sets.append(f"run.corpus={json.dumps(args.corpus)}")
    for key in ("workers", "threads"):
        if getattr(args, key, None) is not None:
            sets.append(f"run.{key}={getattr(args, key)}")
    if getattr(args, "device", None):
        sets.append(f"run.device={json.dumps(args.device)}")
    cfg = load(args.config, sets, getattr(args, "scale", None))
    run_dir = args.run or cfg.run["dir"]
    return cfg, run_dir


def cmd_run(args) -> int:
    from ...cli import env_world_size
    from .. import runtime
    from .runner import run_experiment

    cfg, run_dir = _config(args)
    workers = cfg.run["workers"]
    if workers > 1 and env_world_size() == 1:  # start the workers: one process group
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.run["threads"] or 1))
        return runtime.launch(workers, args.argv)  # each rank reads the same command line
    if env_world_size() not in (1, workers):
        raise CommandError(f"{cfg.path} runs {workers} worker(s), but this launch has "
                           f"{env_world_size()} processes; drop the launcher and set "
                           "run.workers (or --workers)")
    run_experiment(cfg, run_dir, until=args.until)
    _, rank = runtime.init_process_group(cfg.run["device"])
    if rank == 0 and cfg.report and not args.no_report and args.until is None:
        from .report import write_report

        path = write_report(cfg, run_dir)
        with open(path, encoding="utf-8") as f:
            print(f.read())
        print(f"[experiment] wrote {path}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    cfg, run_dir = _config(args)
    path = write_report(cfg, run_dir, args.out)
    print(f"wrote {path}")
    return 0


def cmd_plan(args) -> int:
    from ...mt.direction import Direction
    from .runner import plan, selections

    cfg, run_dir = _config(args)
    dirs = None
    if os.path.exists(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            pairs = json.load(f)["pairs"]
    elif cfg.run.get("pairs"):
        pairs = cfg.run["pairs"]
    else:  # every pair of the corpus
        from ...mt.corpus import load_corpus

        pairs = load_corpus(cfg.run.get("corpus") or "demo", None, 1).pairs
    dirs = [d for p in pairs for d in (p, str(Direction.parse(p).reverse()))]
    waves = plan(cfg, dirs, selections(run_dir) if os.path.isdir(run_dir) else {})
    print(f"{cfg.name}: {len(waves)} waves, run folder {run_dir}, {cfg.run['workers']} worker(s)")
    for i, wave in enumerate(waves):
        print(f"wave {i + 1}:")
        for j in wave:
            print(f"  {j}" if isinstance(j, str) else
                  f"  {j.id} ({j.kind}{', all workers' if j.ddp else ''})")
    return 0


def cmd_publish(args) -> int:
    from .config import fill
    from .publish import publish
    from .runner import selections

    cfg, run_dir = _config(args)
    spec = cfg.report.get("models")
    if not spec:
        raise CommandError(f"{cfg.path} has no [report] models table (which stages to publish)")
    spec = fill(spec, selections(run_dir), f"{cfg.path} [report] models")
    out = args.out or spec["out"]
    sums = publish(run_dir, out, spec["systems"], spec["masks"])
    total = sum(os.path.getsize(os.path.join(out, f)) for f in sums)
    print(f"published {len(sums)} files ({total / 1e6:.1f} MB) to {out}")
    for f, h in sums.items():
        print(f"  {f}  {h}")
    return 0


def cmd_demo(args) -> int:
    """``lass-sparse demo``: the bundled demo experiment."""
    args.config, args.set, args.corpus, args.workers, args.threads = "demo", [], None, None, None
    args.until, args.no_report = None, False
    if args.quiet:
        args.set = ["train.quiet=true"]
    return cmd_run(args)


def _common(p, *, run: bool = False) -> None:
    p.add_argument("config", help="an experiment config (.toml), or the name of a bundled one "
                   "(demo, reproduction, reproduction-seed1, gpu)")
    p.add_argument("--run", help="run folder (default: the config's run.dir, runs/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value (repeatable): run.max_train=100, "
                   "stage.base.steps=50, train.amp=none")
    p.add_argument("--corpus", help="corpus folder (or 'demo'): sets run.corpus")
    p.add_argument("--scale", type=positive_float, help="multiply every stage's step count")
    if run:
        p.add_argument("--workers", type=positive_int,
                       help="processes (one process group): run.workers")
        p.add_argument("--threads", type=nonneg_int,
                       help="torch threads per worker (0: torch's default): run.threads")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N: run.device")


def add_commands(sub) -> None:
    p = sub.add_parser("experiment", help="run, report or publish an experiment config "
                       "(experiments/*.toml)")
    esub = p.add_subparsers(dest="experiment_cmd", required=True,
                            metavar="{run,report,plan,publish}")
    q = esub.add_parser("run", help="run (or resume) every stage, then write the report")
    _common(q, run=True)
    q.add_argument("--until", metavar="STAGE", help="stop after the wave holding STAGE")
    q.add_argument("--no-report", action="store_true", help="do not write the report")
    q.set_defaults(func=cmd_run)
    q = esub.add_parser("report", help="the report (markdown, JSON, figures) of a run")
    _common(q)
    q.add_argument("--out", help="folder (default: the config's report.out, else RUN/results)")
    q.set_defaults(func=cmd_report)
    q = esub.add_parser("plan", help="print the waves and jobs a run would execute")
    _common(q)
    q.set_defaults(func=cmd_plan)
    q = esub.add_parser("publish", help="bf16 models + compact masks into a small run folder")
    _common(q)
    q.add_argument("--out", help="folder (default: the config's report.models.out)")
    q.set_defaults(func=cmd_publish)

    p = sub.add_parser("demo", help="the whole LaSS pipeline on the bundled subset, tiny model "
                       "(= lass-sparse experiment run demo)")
    p.add_argument("--run", default=None, help="run folder (default runs/demo)")
    p.add_argument("--scale", type=positive_float, default=None,
                   help="multiply every step count")
    p.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda:N")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
