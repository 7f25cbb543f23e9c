"""Run an experiment's stage graph over one run folder.

Stages are grouped into *waves* (a stage runs after the stages it names in ``after``, by
default the one before it). Every wave starts with a barrier; its jobs (a stage, or one value of
its ``foreach``) then run: ``ddp = true`` jobs on every worker together (DDP), the others taken
from a shared queue by whichever worker is free, each alone in its process (``workers``
processes form one process group for the whole experiment). A finished job leaves a marker
``RUN/experiment/done/<job>.json`` with its options and time, so a rerun skips it; a stage
killed halfway resumes from its own checkpoint. Wall times per wave go to
``RUN/experiment/timings.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

from ...fileio import atomic_write
from ...mt.direction import zero_shot_directions
from .. import runtime
from . import jobs as job_kinds
from .config import STAGE_KEYS, TRAIN_KEYS, TRAINING_KINDS, Config, ConfigError, fill
from .jobs import state_path


@dataclass
class Job:
    """One unit of work: a stage, or one ``foreach`` value of it."""

    id: str
    stage: str
    kind: str
    params: dict
    ddp: bool

    @property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "params": self.params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def log(msg: str) -> None:
    # one write per line: the workers share stdout, and print() may write the text and its
    # newline separately (unbuffered streams), which lets two workers' lines run together
    sys.stdout.write(f"[experiment {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stdout.flush()


def waves(cfg: Config) -> list[list[dict]]:
    """Stages grouped by dependency depth: every stage of wave k depends only on waves < k."""
    level: dict[str, int] = {}
    for st in cfg.stages:
        level[st["name"]] = 1 + max((level[a] for a in st["after"]), default=-1)
    out: list[list[dict]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for st in cfg.stages:
        out[level[st["name"]]].append(st)
    return out


def selections(run_dir: str) -> dict:
    """Values chosen by ``select`` stages so far (``{variable: value}``)."""
    path = state_path(run_dir, "selected.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: v["value"] for k, v in json.load(f).items()}


def directions_of(spec, run_directions: list[str], cfg: Config, where: str) -> list[str]:
    """``"supervised"`` (the run's directions), ``"zero-shot"`` (every X-Y among
    ``run.zero_shot_langs``), or a list of directions."""
    if spec in (None, "supervised", "all"):
        return list(run_directions)
    if spec == "zero-shot":
        langs = cfg.run.get("zero_shot_langs")
        if not langs:
            raise ConfigError(f"{where}: directions = 'zero-shot' needs run.zero_shot_langs")
        return zero_shot_directions(langs)
    if isinstance(spec, list):
        return [str(d) for d in spec]
    raise ConfigError(f"{where}: directions must be 'supervised', 'zero-shot' or a list, "
                      f"got {spec!r}")


def foreach_values(st: dict, variables: dict, run_directions: list[str], cfg: Config) -> list:
    """Every combination of stage ``st``'s ``foreach`` values (``[{var: value, ...}, ...]``)."""
    fe = dict(st.get("foreach", {}))
    if st["kind"] == "finetune" and "direction" not in fe:
        fe["direction"] = st.get("directions", "supervised")
    combos: list[dict] = [{}]
    for var, values in fe.items():
        if var == "direction":
            values = directions_of(values, run_directions, cfg, f"stage {st['name']!r}")
        elif isinstance(values, str):
            values = fill(values, variables, f"stage {st['name']!r}")
            values = values if isinstance(values, list) else [values]
        combos = [{**c, var: v} for c in combos for v in values]
    return combos


def expand(st: dict, variables: dict, run_directions: list[str], cfg: Config) -> list[Job]:
    """The jobs of stage ``st`` with its variables filled in."""
    jobs = []
    skip = {"name", "kind", "after", "foreach", "use", "ddp", "description"}
    combos = foreach_values(st, variables, run_directions, cfg)
    for combo in combos:
        where = f"stage {st['name']!r}"
        raw = {k: v for k, v in st.items() if k not in skip}
        keep = {"stage": raw.pop("stage")} if st["kind"] == "select" else {}  # a template
        params = {**fill(raw, {**variables, **combo}, where), **keep}
        for var, value in combo.items():  # foreach = {alpha = [...]} sets the stage's alpha
            if var in STAGE_KEYS[st["kind"]] and var not in params and var != "direction":
                params[var] = value
        if st["kind"] == "finetune":
            params["direction"] = combo["direction"]
            params.pop("directions", None)
            params.setdefault("out", "ft/{direction}".format(**combo))
        elif st["kind"] == "evaluate":
            params["directions"] = directions_of(params.get("directions"), run_directions, cfg,
                                                 where)
        tag = ",".join(f"{k}={v}" for k, v in combo.items() if k != "direction")
        if "direction" in combo:
            tag = combo["direction"] + ("," + tag if tag else "")
        if st["kind"] == "evaluate":
            for system, spec in params["systems"].items():
                p = dict(params, systems={system: spec})
                jobs.append(Job(f"{st['name']}[{system}{',' + tag if tag else ''}]",
                                st["name"], "evaluate", p, False))
            continue
        jid = f"{st['name']}[{tag}]" if tag else st["name"]
        jobs.append(Job(jid, st["name"], st["kind"], params, bool(st.get("ddp", False))))
    return jobs


def plan(cfg: Config, run_directions: list[str], variables: dict | None = None
         ) -> list[list[Job | str]]:
    """Every wave's jobs, where its variables are known (else the stage name, unexpanded)."""
    variables = variables or {}
    out = []
    for wave in waves(cfg):
        items: list[Job | str] = []
        for st in wave:
            try:
                items += expand(st, variables, run_directions, cfg)
            except ConfigError:
                items.append(f"{st['name']} (after a select stage)")
        out.append(items)
    return out


def _done_path(run_dir: str, job: Job) -> str:
    safe = job.id.replace("/", "_").replace(" ", "_")
    return state_path(run_dir, "done", f"{safe}.json")


def done_record(run_dir: str, job: Job) -> dict | None:
    """What a finished job left (options key, seconds, result), or None."""
    path = _done_path(run_dir, job)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_done(run_dir: str, job: Job) -> bool:
    rec = done_record(run_dir, job)
    return rec is not None and rec.get("key") == job.key


def _mark_done(run_dir: str, job: Job, seconds: float, result) -> None:
    atomic_write(_done_path(run_dir, job), json.dumps(
        {"job": job.id, "key": job.key, "params": job.params, "seconds": round(seconds, 1),
         "result": result}, indent=1, default=str).encode())


def train_kwargs(params: dict) -> dict:
    """TrainConfig options of a training job, as the CLI passes them (token batches cap rows
    by the token budget only unless batch_size is set)."""
    kw = {k: v for k, v in params.items() if k in TRAIN_KEYS and k != "steps"}
    quiet = kw.pop("quiet", False)
    kw["progress"] = not quiet
    if kw.get("max_tokens") is not None and "batch_size" not in kw:
        kw["batch_size"] = kw["max_tokens"]
    return kw


def execute(run, cfg: Config, job: Job, distributed: bool):
    """Run one job in this process; returns a JSON-able summary."""
    from .. import pipeline as P

    p = dict(job.params)
    if job.kind in TRAINING_KINDS:
        kw = train_kwargs(p)
        if job.kind == "train":
            return P.train(run, p["steps"], out=p.get("out", job.stage), init=p.get("init"),
                           directions=p.get("directions"), distributed=distributed, **kw)
        if job.kind == "finetune":
            return P.finetune(run, p["direction"], p["steps"], init=p.get("init", "base"),
                              out=p["out"], distributed=distributed, **kw)
        if job.kind == "joint":
            return P.joint(run, p["masks"], p["steps"], init=p.get("init", "base"),
                           out=p.get("out", job.stage), directions=p.get("directions"),
                           distributed=distributed, **kw)
        return job_kinds.extend(run, p, kw, distributed)
    if job.kind == "prune":
        bank = P.prune(run, float(p["alpha"]), directions=p.get("directions"),
                       out=p.get("out", "masks.safetensors"), random=p.get("random", False),
                       seed=p.get("seed", 0), ft_prefix=p.get("ft_prefix", "ft"),
                       shared_from=p.get("shared_from"))
        st = bank.stats()
        res = {"pairs": st["pairs"], "bytes_per_pair": st["bytes_per_pair"]}
        if p.get("compact_copy"):
            res["compact_bytes"] = bank.save(run.path(p["compact_copy"]), compact=True)
            res["compact_bits_per_weight_per_pair"] = (
                res["compact_bytes"] * 8 / (st["weights_per_pair"] * st["pairs"]))
        return res
    if job.kind == "select":
        return job_kinds.select(run, p, state_path(run.dir, "selected.json"))
    if job.kind == "evaluate":
        return job_kinds.evaluate(run, p, state_path(run.dir, "eval", job.stage))
    if job.kind == "weight_change":
        return job_kinds.weight_change(run, p, state_path(run.dir, f"{job.stage}.json"))
    raise ConfigError(f"unknown stage kind {job.kind!r}")


def _record_timing(run_dir: str, label: str, seconds: float) -> None:
    path = state_path(run_dir, "timings.json")
    t = {}
    if os.path.exists(path):
        with open(path) as f:
            t = json.load(f)
    t[label] = round(t.get(label, 0.0) + seconds, 1)
    atomic_write(path, json.dumps(t, indent=1).encode())


def open_run(cfg: Config, run_dir: str, device: str):
    """Create (rank 0; the others wait) or reopen the experiment's run folder."""
    r = cfg.run
    if r.get("corpus") is None:
        raise ConfigError(f"{cfg.path}: this experiment needs a corpus: pass --corpus DIR (e.g. "
                          "../shared/corpus, or one built with `lass-sparse corpus build`), or "
                          "set run.corpus")
    if r["corpus"] != "demo" and not os.path.isdir(r["corpus"]):
        raise ConfigError(f"corpus folder {r['corpus']} does not exist (run.corpus of "
                          f"{cfg.path}, or --corpus)")
    return runtime.create_or_open(
        run_dir, corpus=r["corpus"], device=device, config=r["model"],
        vocab_size=r["vocab_size"], pairs=r.get("pairs"), max_train=r.get("max_train"),
        seed=r["seed"], langtok=r["langtok"], mask_output_proj=r["mask_output_proj"],
        **r.get("model_overrides", {}))


def run_experiment(cfg: Config, run_dir: str, *, until: str | None = None) -> dict:
    """Run (or resume) every stage of ``cfg`` in ``run_dir``; returns the timings."""
    import torch

    device = cfg.run["device"]
    if cfg.run["threads"]:
        torch.set_num_threads(int(cfg.run["threads"]))
    world, rank = runtime.init_process_group(device)
    run = open_run(cfg, run_dir, device)
    lead = rank == 0
    if lead:
        os.makedirs(state_path(run_dir), exist_ok=True)
        atomic_write(state_path(run_dir, "config.json"), json.dumps(
            {"path": cfg.path, "name": cfg.name, "config": cfg.raw}, indent=1,
            default=str).encode())
        log(f"{cfg.name}: run folder {run_dir}, {len(run.directions)} directions, "
            f"{world} worker(s)")
    all_waves = waves(cfg)
    for i, wave in enumerate(all_waves):
        runtime.barrier()
        variables = selections(run_dir)
        jobs = [j for st in wave for j in expand(st, variables, run.directions, cfg)]
        todo = [j for j in jobs if not is_done(run_dir, j)]
        label = " | ".join(st["name"] for st in wave)
        if not todo:
            if lead:
                log(f"wave {i + 1}/{len(all_waves)} ({label}): done before")
        else:
            t0 = time.time()
            if lead:
                log(f"wave {i + 1}/{len(all_waves)} ({label}): {len(todo)} job(s)")
            for job in [j for j in todo if j.ddp]:
                t = time.time()
                res = execute(run, cfg, job, distributed=True)
                if lead:
                    _mark_done(run_dir, job, time.time() - t, res)
                    log(f"  {job.id}: {time.time() - t:.0f} s (all {world} workers)")
                runtime.barrier()
            single = [j for j in todo if not j.ddp]
            for k in runtime.claimed(f"wave{i}", len(single), world, rank):
                job = single[k]
                t = time.time()
                res = execute(run, cfg, job, distributed=False)
                _mark_done(run_dir, job, time.time() - t, res)
                log(f"  {job.id}: {time.time() - t:.0f} s (worker {rank})")
            runtime.barrier()
            if lead:
                _record_timing(run_dir, label, time.time() - t0)
        if until is not None and any(st["name"] == until for st in wave):
            break
    runtime.barrier()
    path = state_path(run_dir, "timings.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}
