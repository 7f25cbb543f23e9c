"""Experiment configs: one TOML file names the corpus, pairs, model, stages, controls, seeds and
evaluation of an experiment (``experiments/*.toml``).

Layout (every key is checked; an unknown one is an error naming the file and the key)::

    name = "demo"                  # also the default run folder: runs/<name>
    title = "..."                  # the report's title
    extends = "reproduction.toml"  # optional: start from another config (stages appended)

    [run]        corpus, pairs, max_train, vocab_size, model (tiny|small|base|big),
                 model_overrides, langtok, mask_output_proj, seed, device, workers, threads,
                 zero_shot_langs, dir
    [train]      defaults of every training stage (TrainConfig fields: amp, lr, max_tokens, ...)
    [templates.NAME]  training options a stage takes with ``use = "NAME"``
    [[stage]]    name, kind, after, foreach, use, ddp, and the kind's own options (STAGE_KEYS)
    [report]     out, sections and comparisons (see :mod:`.report`)

Strings may hold ``{variable}``: a ``foreach`` value of the stage (``foreach = {alpha =
[0.5, 0.7]}``, ``{direction}`` for per-direction stages) or a value chosen by an earlier
``select`` stage. ``--set KEY=VALUE`` overrides any value (``run.max_train=100``,
``stage.base.steps=5``, ``train.amp=none``); ``--scale`` multiplies every step count.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from ...mt.direction import Direction

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments")

RUN_KEYS = {"corpus", "pairs", "max_train", "vocab_size", "model", "model_overrides", "langtok",
            "mask_output_proj", "seed", "device", "workers", "threads", "zero_shot_langs", "dir"}
TRAIN_KEYS = {"steps", "batch_size", "max_tokens", "lr", "warmup", "temperature", "weight_decay",
              "label_smoothing", "clip_norm", "amp", "seed", "ckpt_every", "log_every",
              "validate_every", "patience", "valid_limit", "dropout", "accum", "fsdp", "compile",
              "quiet"}
COMMON_KEYS = {"name", "kind", "after", "foreach", "use", "ddp", "description"}
STAGE_KEYS = {
    "train": TRAIN_KEYS | {"out", "init", "directions"},
    "finetune": TRAIN_KEYS | {"out", "init", "directions"},
    "joint": TRAIN_KEYS | {"out", "init", "directions", "masks"},
    "extend": TRAIN_KEYS | {"out", "init", "directions", "masks", "ft_steps", "ft_init", "alpha",
                            "strict", "copy_finetunes_from"},
    "prune": {"alpha", "out", "directions", "random", "shared_from", "ft_prefix", "seed",
              "compact_copy"},
    "select": {"variable", "values", "stage", "by"},
    "evaluate": {"systems", "directions", "limit", "beam", "split", "batch_size",
                 "materialize"},
    "weight_change": {"before", "after_stages", "masks"},
}
TRAINING_KINDS = ("train", "finetune", "joint", "extend")
REPORT_KEYS = {"out", "supervised", "sweep", "zero_shot", "baseline", "comparisons",
               "similarity_masks", "layer_pairs", "extension", "seeds", "discussion", "models",
               "systems_note", "protocol_note"}


class ConfigError(ValueError):
    """A config file that cannot run: one line naming the file, the key and what was expected."""


@dataclass
class Config:
    path: str
    name: str
    title: str
    run: dict
    train: dict
    templates: dict
    stages: list[dict]
    report: dict
    raw: dict = field(repr=False, default_factory=dict)

    def stage(self, name: str) -> dict:
        for st in self.stages:
            if st["name"] == name:
                return st
        raise ConfigError(f"{self.path}: no stage named {name!r} (stages: "
                          f"{', '.join(s['name'] for s in self.stages)})")


def resolve_path(spec: str) -> str:
    """A config path, or a bare name of a bundled config (``demo`` → experiments/demo.toml)."""
    if os.path.exists(spec):
        return spec
    for cand in (os.path.join("experiments", spec), os.path.join("experiments", spec + ".toml"),
                 os.path.join(BUILTIN_DIR, spec), os.path.join(BUILTIN_DIR, spec + ".toml")):
        if os.path.exists(cand):
            return cand
    names = sorted(f[:-5] for f in os.listdir(BUILTIN_DIR) if f.endswith(".toml")) \
        if os.path.isdir(BUILTIN_DIR) else []
    raise ConfigError(f"experiment config {spec!r} not found (a .toml path, or one of the "
                      f"bundled configs: {', '.join(names)})")


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: tables merge key by key, ``stage`` lists are appended (a
    stage of the same name replaces the base's)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == "stage":
            stages = out.get("stage", [])
            for st in v:
                names = [s.get("name") for s in stages]
                if st.get("name") in names:
                    stages[names.index(st.get("name"))] = copy.deepcopy(st)
                else:
                    stages.append(copy.deepcopy(st))
            out["stage"] = stages
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_raw(path: str, seen: tuple[str, ...] = ()) -> dict:
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    raw = _read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name, got {parent!r}")
    ppath = os.path.join(os.path.dirname(path), parent)
    if not os.path.exists(ppath):
        raise ConfigError(f"{path}: extends {parent!r}, which does not exist ({ppath})")
    base = _load_raw(ppath, seen + (real,))
    base.pop("name", None)
    base.pop("title", None)
    if "report" in raw:  # a config's report replaces its base's whole
        base.pop("report", None)
    return _merge(base, raw)


def _coerce(text: str) -> Any:
    """A ``--set`` value: TOML syntax where it parses (numbers, booleans, lists), else a
    string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_set(raw: dict, item: str, path: str = "--set") -> None:
    """``KEY=VALUE`` with KEY a dotted path (``run.max_train``, ``stage.base.steps``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set: expected KEY=VALUE (e.g. run.max_train=100), got {item!r}")
    parts = key.strip().split(".")
    val = _coerce(value.strip())
    if parts[0] == "stage":
        if len(parts) < 3:
            raise ConfigError(f"--set {item}: stage keys are stage.NAME.KEY")
        name = parts[1]
        for st in raw.get("stage", []):
            if st.get("name") == name:
                _set_in(st, parts[2:], val)
                return
        raise ConfigError(f"--set {item}: no stage named {name!r}")
    _set_in(raw, parts, val)


def _set_in(d: dict, parts: list[str], val: Any) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set: {'.'.join(parts)} is not inside a table")
    d[parts[-1]] = val


def load(spec: str, sets: list[str] | None = None, scale: float | None = None) -> Config:
    """Read and check a config (``spec``: a path or a bundled name), with ``--set`` overrides
    and ``--scale`` applied."""
    path = resolve_path(spec)
    raw = _load_raw(path)
    for item in sets or []:
        apply_set(raw, item)
    return check(raw, path, scale)


def _unknown(where: str, keys, allowed: set[str]) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (expected some of "
                          f"{', '.join(sorted(allowed))})")


def check(raw: dict, path: str, scale: float | None = None) -> Config:
    _unknown(path, raw, {"name", "title", "description", "run", "train", "templates", "stage",
                         "report"})
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    run = dict(raw.get("run", {}))
    _unknown(f"{path} [run]", run, RUN_KEYS)
    for p in run.get("pairs") or []:
        try:
            ok = Direction.parse(p).is_english_centric()
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{path} [run]: pairs are English-centric language pairs like "
                              f"'en-de', got {p!r}")
    run.setdefault("model", "tiny")
    run.setdefault("vocab_size", 4000)
    run.setdefault("langtok", "src")
    run.setdefault("mask_output_proj", True)
    run.setdefault("seed", 0)
    run.setdefault("device", "auto")
    run.setdefault("workers", 1)
    run.setdefault("threads", 0)
    run.setdefault("dir", os.path.join("runs", name))
    for key in ("workers",):
        if not isinstance(run[key], int) or run[key] < 1:
            raise ConfigError(f"{path} [run]: {key} must be an integer >= 1, got {run[key]!r}")
    train = dict(raw.get("train", {}))
    _unknown(f"{path} [train]", train, TRAIN_KEYS)
    templates = raw.get("templates", {})
    for tname, t in templates.items():
        _unknown(f"{path} [templates.{tname}]", t, TRAIN_KEYS)
    stages = []
    names = set()
    for i, st in enumerate(raw.get("stage", [])):
        st = dict(st)
        where = f"{path} [[stage]] #{i + 1}"
        if "name" not in st or "kind" not in st:
            raise ConfigError(f"{where}: every stage needs a name and a kind")
        where = f"{path} stage {st['name']!r}"
        if st["name"] in names:
            raise ConfigError(f"{where}: two stages have this name")
        names.add(st["name"])
        kind = st["kind"]
        if kind not in STAGE_KEYS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(STAGE_KEYS)}, got "
                              f"{kind!r}")
        _unknown(where, st, STAGE_KEYS[kind] | COMMON_KEYS)
        if "use" in st:
            if kind not in TRAINING_KINDS:
                raise ConfigError(f"{where}: `use` (a training template) needs a training kind")
            if st["use"] not in templates:
                raise ConfigError(f"{where}: use = {st['use']!r}, but there is no "
                                  f"[templates.{st['use']}]")
            st = {**templates[st["use"]], **st}
        if kind in TRAINING_KINDS:
            st = {**train, **st}
            if "steps" not in st:
                raise ConfigError(f"{where}: a training stage needs steps")
            if scale is not None:
                for k in ("steps", "ft_steps"):
                    if k in st:
                        st[k] = max(1, int(st[k] * scale))
        after = st.get("after")
        if after is None:
            st["after"] = [stages[-1]["name"]] if stages else []
        else:
            st["after"] = [after] if isinstance(after, str) else list(after)
            for a in st["after"]:
                if a not in names - {st["name"]}:
                    raise ConfigError(f"{where}: after = {a!r}, which is not an earlier stage")
        fe = st.get("foreach", {})
        if not isinstance(fe, dict) or not all(isinstance(v, (list, str)) for v in fe.values()):
            raise ConfigError(f"{where}: foreach must be a table of lists, e.g. "
                              "foreach = {alpha = [0.5, 0.7]}")
        stages.append(st)
    report = dict(raw.get("report", {}))
    _unknown(f"{path} [report]", report, REPORT_KEYS)
    return Config(path, name, raw.get("title", name), run, train, templates, stages, report,
                  raw)


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(value: Any, variables: dict, where: str) -> Any:
    """``value`` with ``{name}`` replaced from ``variables`` (recursively in lists and
    tables); a whole-string ``"{alpha}"`` keeps the variable's type."""
    if isinstance(value, str):
        m = _FIELD.fullmatch(value)
        if m:
            return _lookup(m.group(1), variables, where)
        return _FIELD.sub(lambda m: str(_lookup(m.group(1), variables, where)), value)
    if isinstance(value, list):
        return [fill(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {fill(k, variables, where): fill(v, variables, where) for k, v in value.items()}
    return value


def _lookup(name: str, variables: dict, where: str):
    if name not in variables:
        raise ConfigError(f"{where}: {{{name}}} is not set (a foreach variable of the stage or "
                          f"a value chosen by an earlier select stage; known: "
                          f"{', '.join(sorted(variables)) or 'none'})")
    return variables[name]
