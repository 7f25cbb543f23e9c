"""The experiment's job kinds beyond the pipeline's stage functions: extension, α selection,
evaluation shares and the strict-mode weight check."""

from __future__ import annotations

import json
import os
import shutil

from ...fileio import atomic_write
from .config import ConfigError

STATE_DIR = "experiment"  # RUN/experiment/: done markers, selections, evaluations, timings


def state_path(run_dir: str, *parts: str) -> str:
    """A path under the run's experiment state folder."""
    return os.path.join(run_dir, STATE_DIR, *parts)


def stage_summary(run_dir: str, stage: str) -> dict:
    """Steps, cap, best step and validation loss of a trained stage (from its last
    checkpoint)."""
    path = os.path.join(run_dir, stage, "ckpt", "state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage {stage!r} has no checkpoint ({path}); run it first")
    with open(path) as f:
        st = json.load(f)
    v = st.get("valid", {})
    return {"steps": st["step"], "cap": st["config"]["steps"], "best_step": v.get("best_step"),
            "best_valid_loss": v.get("best"), "stopped_early": bool(v.get("stopped")),
            "lr": st["config"]["lr"], "max_tokens": st["config"]["max_tokens"],
            "seed": st["config"].get("seed")}


def curve(run_dir: str, stage: str) -> list[dict]:
    """Validation losses of a stage (``log.jsonl``), ``[{step, valid_loss}]``."""
    path = os.path.join(run_dir, stage, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{"step": r["step"], "valid_loss": r["valid_loss"]}
                for r in map(json.loads, f) if "valid_loss" in r]


def extend(run, p: dict, kw: dict, distributed: bool) -> dict:
    """``pipeline.extend`` (paper or strict mode); ``copy_finetunes_from`` reuses another
    extension's fine-tunes of the same directions (both modes start from the same masks)."""
    from .. import pipeline as P

    dirs = p["directions"]
    dirs = [dirs] if isinstance(dirs, str) else list(dirs)
    out = p.get("out") or f"extend/{'+'.join(dirs)}"
    src = p.get("copy_finetunes_from")
    if src and not os.path.exists(run.path(out, "ft")):
        if not os.path.exists(run.path(src, "ft")):
            raise FileNotFoundError(f"copy_finetunes_from = {src!r}: {run.path(src, 'ft')} does "
                                    "not exist (run that stage first)")
        shutil.copytree(run.path(src, "ft"), run.path(out, "ft"))
    res = P.extend(run, dirs, masks=p["masks"], init=p.get("init", "joint"),
                   ft_steps=p.get("ft_steps", 100), steps=p["steps"], alpha=p.get("alpha"),
                   strict=bool(p.get("strict", False)), ft_init=p.get("ft_init", "base"),
                   out=out, distributed=distributed, **kw)
    return {"train": res["train"], "masks": res["masks"]}


def select(run, p: dict, path: str) -> dict:
    """Choose ``variable`` among ``values`` by the best validation loss of the stage each value
    trained (``stage``, e.g. ``joint-a{alpha}``); written to ``selected.json``."""
    var, values = p.get("variable"), p.get("values")
    if not var or not isinstance(values, list) or not values:
        raise ConfigError("a select stage needs variable and a non-empty list of values")
    if p.get("by", "valid_loss") != "valid_loss":
        raise ConfigError(f"select: by must be 'valid_loss' (validation data only), got "
                          f"{p['by']!r}")
    template = p.get("stage")
    if not template or "{" + var + "}" not in template:
        raise ConfigError(f"select: stage must name the trained stage per value with "
                          f"{{{var}}} in it, got {template!r}")
    losses = {}
    for v in values:
        st = stage_summary(run.dir, template.replace("{" + var + "}", str(v)))
        if st["best_valid_loss"] is None:
            raise ValueError(f"select: stage {template} at {var}={v} has no validation loss "
                             "(train it with validate_every)")
        losses[str(v)] = st["best_valid_loss"]
    best = min(values, key=lambda v: losses[str(v)])
    sel = {}
    if os.path.exists(path):
        with open(path) as f:
            sel = json.load(f)
    sel[var] = {"value": best, "valid_loss": losses, "stage": template}
    atomic_write(path, json.dumps(sel, indent=1).encode())
    return sel[var]


def parse_system(spec: str) -> tuple[str, str | None]:
    """``STAGE`` (dense) or ``STAGE@MASKS``."""
    stage, _, masks = str(spec).partition("@")
    if not stage:
        raise ConfigError(f"a system is STAGE or STAGE@MASKS, got {spec!r}")
    return stage, masks or None


def evaluate(run, p: dict, folder: str) -> dict:
    """One system on the stage's directions: results and hypotheses to
    ``FOLDER/<system>.json``; returns its average BLEU."""
    from .. import pipeline as P

    (name, spec), = p["systems"].items()
    hyps: dict = {}
    res = P.evaluate(run, {name: parse_system(spec)}, p["directions"], split=p.get("split",
                     "test"), limit=p.get("limit"), beam=p.get("beam", 4),
                     batch_size=p.get("batch_size", 64), progress=False, hyps_out=hyps,
                     materialize=bool(p.get("materialize", False)))
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, f"{name}.json"), json.dumps(
        {"system": name, "spec": spec, "results": res[name], "hyps": hyps[name]}).encode())
    bleu = [r["bleu"] for r in res[name].values()]
    return {"system": name, "average_bleu": sum(bleu) / len(bleu)}


def load_eval(run_dir: str, stage: str) -> tuple[dict, dict]:
    """``(results, hyps)`` of every system an evaluate stage scored: ``{system: {direction:
    ...}}``."""
    folder = state_path(run_dir, "eval", stage)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no results of evaluate stage {stage!r} ({folder}); run it "
                                "first")
    res, hyps = {}, {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".json"):
            with open(os.path.join(folder, f)) as fh:
                e = json.load(fh)
            res[e["system"]] = e["results"]
            hyps[e["system"]] = {d: tuple(v) for d, v in e["hyps"].items()}
    return res, hyps


def weight_change(run, p: dict, path: str) -> dict:
    """Largest change, from stage ``before`` to each of ``after_stages``, of every old pair's
    effective weights (W ⊙ M over each mask of ``masks``) and of every other parameter —
    0 means strict extension left the old pairs bit-identical."""
    from ...ops import unpack_mask
    from .. import pipeline as P

    old = P.load_bank(run, p["masks"])

    def weights(stage: str) -> dict:
        model = run.load_model(stage, device="cpu")
        out = dict(model.state_dict())
        for n in old.shapes:  # a tied output projection's matrix is the embedding
            mod, _, attr = n.rpartition(".")
            out[n] = getattr(model.get_submodule(mod), attr).detach()
        return out

    before = weights(p["before"])
    dense = [n for n in before if n not in old.shapes]
    changes = {}
    for stage in p["after_stages"]:
        after = weights(stage)
        diff = max(float((before[n] - after[n]).abs().max()) for n in dense)
        for d in old.pairs:
            for n, bits in old[d].items():
                m = unpack_mask(bits, old.shapes[n][-1])
                diff = max(diff, float(((before[n] - after[n]) * m).abs().max()))
        changes[stage] = diff
    atomic_write(path, json.dumps(changes, indent=1).encode())
    return changes
