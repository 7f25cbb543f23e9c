"""An experiment's report: markdown + JSON + figures from the run folder and the config.

Sections follow the config's ``[report]`` table (each is written where its key is set):

- protocol (always): data, model, every stage's options, stopping rule, how it ran;
- convergence (always): every trained stage's steps, cap, best step and validation loss, the
  curves figure, values chosen by ``select`` stages, wall time per wave;
- ``supervised`` / ``zero_shot``: an evaluate stage each, or a list of them merged (systems
  scored in different waves) — BLEU/chrF/ACC per direction and system, win ratios, and paired
  bootstraps for ``comparisons`` (``[[system, baseline], ...]``);
- ``sweep``: ``{eval = EVAL, variable = NAME}`` — every value of a ``select``-ed variable
  scored on the test set beside its validation loss (the choice uses validation only), each
  against ``baseline`` with the paired bootstrap;
- ``extension``: ``{new = EVAL, old = EVAL, reference = SYSTEM, reference_eval = EVAL,
  check = STAGE}`` — the new directions, every old direction's change, the strict-mode check;
- ``seeds``: ``{pairs = [[lass, dense], ...], masks = [bank, ...], eval = [EVAL, ...]}`` —
  the comparison per seed and pooled over seeds, and mask similarity across seeds;
- ``similarity_masks`` (+ ``layer_pairs``): heatmap, per-layer similarity, cross-direction
  statistics;
- ``models``: the published folder's files and hashes; ``discussion``: a hand-written file
  appended.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from ...fileio import atomic_write
from ...mt.direction import Direction
from ...mt.metrics import pooled_bootstrap, significance
from ...mt.report import render_significance, render_table
from .config import TRAINING_KINDS, Config, fill
from .jobs import curve, load_eval, stage_summary, state_path
from .runner import done_record, expand, foreach_values, selections


def _avg(res: dict, system: str, dirs: list[str], metric: str) -> float:
    return sum(res[system][d][metric] for d in dirs) / len(dirs)


def pooled_row(name: str, sig: dict) -> str:
    """A markdown row: pooled Δ BLEU, its 95% CI, p, directions better, significantly better."""
    b = sig["pooled"]["bleu"]
    lo, hi = b["delta_ci95"]
    wins = sum(t["bleu"]["delta"] > 0 for t in sig["directions"].values())
    signif = sum(t["bleu"]["p_value"] < 0.05 and t["bleu"]["delta"] > 0
                 for t in sig["directions"].values())
    n = len(sig["directions"])
    return (f"| {name} | {b['delta']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {b['p_value']:.3f} | "
            f"{wins}/{n} | {signif}/{n} |")


POOLED_HEAD = ["| paired test, pooled over directions | Δ BLEU | 95% CI of Δ | p | directions "
               "better | better with p < 0.05 |", "|---|---|---|---|---|---|"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(__file__)
                              ).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Report:
    """Builds the report of ``cfg`` from ``run_dir``; :meth:`write` puts it in ``out_dir``."""

    def __init__(self, cfg: Config, run_dir: str, out_dir: str) -> None:
        self.cfg, self.run_dir, self.out_dir = cfg, run_dir, out_dir
        self.vars = selections(run_dir)
        with open(os.path.join(run_dir, "run.json")) as f:
            self.info = json.load(f)
        self.directions = [d for p in self.info["pairs"]
                           for d in (p, str(Direction.parse(p).reverse()))]
        self.jobs = {st["name"]: self._expand(st) for st in cfg.stages}
        self.data: dict = {"name": cfg.name, "config": cfg.path, "selected": self.vars}
        self.figures: list[str] = []
        self._loaded: dict[str, tuple[dict, dict]] = {}  # evaluate stage -> load_eval, read once

    def _expand(self, st: dict):
        try:
            return expand(st, self.vars, self.directions, self.cfg)
        except ValueError:
            return []

    def _eval(self, stage: str | list[str]) -> tuple[dict, dict]:
        """An evaluate stage's results and hypotheses, systems in the config's order; a list of
        stages is merged in its order (e.g. θ0 scored in an earlier wave, beside training)."""
        if isinstance(stage, list):
            parts = [self._eval(s) for s in stage]
            return ({k: v for r, _ in parts for k, v in r.items()},
                    {k: v for _, h in parts for k, v in h.items()})
        if stage not in self._loaded:
            self._loaded[stage] = load_eval(self.run_dir, stage)
        res, hyps = self._loaded[stage]
        order = [next(iter(j.params["systems"])) for j in self.jobs.get(stage, [])]
        order += [s for s in res if s not in order]
        return ({s: res[s] for s in order if s in res}, {s: hyps[s] for s in order if s in hyps})

    def _r(self, key: str, default=None):
        v = self.cfg.report.get(key, default)
        return fill(v, self.vars, f"{self.cfg.path} [report] {key}") if v is not None else None

    def _has_discussion(self) -> bool:
        disc = self._r("discussion")
        return bool(disc) and os.path.exists(disc)

    def _png(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    # ------------------------------------------------------------------ sections

    def protocol(self) -> list[str]:
        info, m = self.info, self.info["model"]
        n_train = info.get("max_train")
        lines = [f"# {self.cfg.title}", "",
                 f"Generated by `lass-sparse experiment report {self.cfg.path}` from the run "
                 f"folder `{self.run_dir}`" + ("; the discussion at the end is hand-written."
                                               if self._has_discussion() else "."), "",
                 "## Protocol", "",
                 f"- **Data**: corpus `{info['corpus']}`, pairs {', '.join(info['pairs'])} (both "
                 "directions" + (f"; the first {n_train:,} training sentence pairs of each)."
                                 if n_train else ", every training sentence pair)."),
                 f"- **Model** `{info.get('config_name', '?')}` (d={m['d_model']}, "
                 f"{m['enc_layers']}+{m['dec_layers']} layers, FFN {m['ffn']}, "
                 f"{m['vocab_size']:,} SentencePiece pieces, dropout {m['dropout']}), "
                 f"encoder language tag `{info.get('langtok', 'tgt')}`, output projection "
                 f"{'masked' if m.get('mask_output_proj') else 'dense'} per pair.",
                 f"- **Workers**: {self.cfg.run['workers']} process(es) in one process group, "
                 f"{self.cfg.run['threads'] or 'default'} thread(s) each, device "
                 f"`{self.cfg.run['device']}`.", "",
                 "| stage | kind | after | options |", "|---|---|---|---|"]
        skip = {"name", "kind", "after", "description"}
        for st in self.cfg.stages:
            opts = ", ".join(f"{k}={v}" for k, v in st.items() if k not in skip)
            lines.append(f"| {st['name']} | {st['kind']} | {', '.join(st['after']) or '—'} | "
                         f"{opts} |")
        note = self._r("protocol_note")
        lines += ["", *([note, ""] if note else []),
                  "Training stages with `validate_every` and `patience` stop after `patience` "
                  "validations without improvement and keep the best checkpoint; `steps` is a "
                  "cap (a stage that reaches it is reported as not converged). Later stages "
                  "start from a stage's best checkpoint. Choices (`select` stages) use "
                  "validation loss only.", "",
                  f"Rerun: `lass-sparse experiment run {self.cfg.path}` (resumes from the run "
                  f"folder), then `lass-sparse experiment report {self.cfg.path}`; commit "
                  f"{_commit()}.", ""]
        return lines

    def convergence(self) -> list[str]:
        stages = {}
        for jobs in self.jobs.values():
            for j in jobs:
                if j.kind in TRAINING_KINDS:
                    out = j.params.get("out", j.stage)
                    outs = [out]
                    if j.kind == "extend":
                        dirs = j.params["directions"]
                        dirs = [dirs] if isinstance(dirs, str) else dirs
                        outs = ([f"{out}/ft"] if len(dirs) == 1 else
                                [f"{out}/ft/{d}" for d in dirs]) + [out]
                    for o in outs:
                        if os.path.exists(os.path.join(self.run_dir, o, "ckpt", "state.json")):
                            stages[o] = stage_summary(self.run_dir, o)
        self.data["stages"] = stages
        self.data["curves"] = {s: curve(self.run_dir, s) for s in stages}
        lines = ["## Convergence", ""]
        if any(self.data["curves"].values()):
            self._curves_png(os.path.join(self.out_dir, "curves.png"))
            lines += ["![validation curves](curves.png)", ""]
        lines += ["| stage | steps run | cap | best step | best valid loss | stopped by the "
                  "rule |", "|---|---|---|---|---|---|"]
        for s, r in stages.items():
            loss = f"{r['best_valid_loss']:.4f}" if r["best_valid_loss"] is not None else "—"
            lines.append(f"| {s} | {r['steps']} | {r['cap']} | {r['best_step'] or '—'} | "
                         f"{loss} | {'yes' if r['stopped_early'] else 'no (cap)'} |")
        path = state_path(self.run_dir, "selected.json")
        if os.path.exists(path):
            with open(path) as f:
                sel = json.load(f)
            self.data["selections"] = sel
            for var, s in sel.items():
                lines += ["", f"{var} chosen on validation loss ({s['stage']}): " + ", ".join(
                    f"{var}={k}: {v:.4f}" for k, v in s["valid_loss"].items())
                    + f" → **{var}={s['value']}**."]
        path = state_path(self.run_dir, "timings.json")
        if os.path.exists(path):
            with open(path) as f:
                t = json.load(f)
            self.data["timings_s"] = t
            lines += ["", "Wall time per wave (stages run side by side are joined by |): "
                      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items()) + "."]
        masks = self._mask_stats()
        if masks:
            lines += ["", masks]
        return lines + [""]

    def _mask_stats(self) -> str | None:
        for jobs in self.jobs.values():
            for j in jobs:
                if j.kind != "prune" or not j.params.get("compact_copy"):
                    continue
                rec = done_record(self.run_dir, j)
                if rec is not None:
                    r = rec["result"]
                    self.data["mask_bank"] = r
                    return (f"Mask bank `{j.params.get('out')}`: {r['pairs']} pairs, "
                            f"{r['bytes_per_pair']} B/pair packed in memory, "
                            f"{r['compact_bits_per_weight_per_pair']:.3f} bit/weight/pair "
                            "compact on disk.")
        return None

    def _curves_png(self, out_png: str) -> None:
        from ..plots import _plt, _save

        plt = _plt()
        curves = self.data["curves"]
        groups = {"multilingual (θ0) and dense stages": [], "fine-tunes": [],
                  "masked joint stages and extensions": []}
        kind = {}
        for jobs in self.jobs.values():
            for j in jobs:
                kind[j.params.get("out", j.stage)] = j.kind
        for s in curves:
            k = kind.get(s, "finetune" if "/ft" in s else "extend")
            groups["fine-tunes" if k == "finetune" or "/ft" in s else
                   "multilingual (θ0) and dense stages" if k == "train" else
                   "masked joint stages and extensions"].append(s)
        fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
        for ax, (title, stages) in zip(axes, groups.items()):
            for st in stages:
                pts = curves.get(st) or []
                if pts:
                    ax.plot([q["step"] for q in pts], [q["valid_loss"] for q in pts], lw=1,
                            label=st, marker="." if len(pts) < 30 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step of the stage")
            ax.set_ylabel("validation loss (label-smoothed CE)")
            if any(curves.get(st) for st in stages):
                ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        self.figures.append(_save(plt, fig, out_png))

    def _comparisons(self, hyps: dict, dirs: list[str]) -> tuple[list[str], dict]:
        rows, sigs = [], {}
        for sys_name, base in self._r("comparisons", []) or []:
            if sys_name in hyps and base in hyps:
                sig = significance({base: hyps[base], sys_name: hyps[sys_name]}, base, dirs)
                sigs[f"{sys_name} vs {base}"] = sig[sys_name]
                rows.append(pooled_row(f"{sys_name} vs {base}", sig[sys_name]))
        return rows, sigs

    def supervised(self) -> list[str]:
        stage = self._r("supervised")
        res, hyps = self._eval(stage)
        dirs = list(next(iter(res.values())))
        baseline = self._r("baseline")
        base = baseline if baseline in res else None
        self.data["supervised"] = res
        n = next(iter(next(iter(res.values())).values()))["n"]
        lines = ["## Supervised directions", "",
                 f"{len(dirs)} directions, {n} test rows each (the same rows for every system)."
                 + (f" {self._r('systems_note')}" if self._r("systems_note") else ""), "",
                 render_table(res, dirs, baseline=base), ""]
        rows, sigs = self._comparisons(hyps, dirs)
        self.data["significance_supervised"] = sigs
        if rows:
            lines += [*POOLED_HEAD, *rows, ""]
            for name, sig in sigs.items():
                lines += [render_significance({name.split(" vs ")[0]: sig},
                                              name.split(" vs ")[1])]
        return lines

    def zero_shot(self) -> list[str]:
        stage = self._r("zero_shot")
        res, hyps = self._eval(stage)
        dirs = list(next(iter(res.values())))
        baseline = self._r("baseline")
        self.data["zero_shot"] = res
        lines = [f"## Zero-shot ({len(dirs)} directions; LaSS uses merged X→en encoder / en→Y "
                 "decoder masks)", "",
                 "ACC = share of outputs in the target language (langid).", "",
                 "| system | BLEU | ACC | off-target |", "|---|---|---|---|"]
        for name in res:
            acc = _avg(res, name, dirs, "acc")
            lines.append(f"| {name} | {_avg(res, name, dirs, 'bleu'):.2f} | {acc:.3f} | "
                         f"{1 - acc:.1%} |")
        lines += ["", render_table(res, dirs, baseline=baseline if baseline in res else None),
                  ""]
        if baseline in hyps and len(hyps) > 1:
            sig = significance(hyps, baseline, dirs)
            self.data["significance_zero_shot"] = sig
            lines += [render_significance(sig, baseline)]
        return lines

    def sweep(self) -> list[str]:
        cfg = self._r("sweep")
        stage, var = cfg["eval"], cfg["variable"]
        res, hyps = self._eval(stage)
        with open(state_path(self.run_dir, "selected.json")) as f:
            sel = json.load(f)[var]
        st = next(s for s in self.cfg.stages if s["name"] == stage)
        value_of = {}
        for combo in foreach_values(st, self.vars, self.directions, self.cfg):
            value = next(iter(combo.values()))
            for name in fill(st["systems"], {**self.vars, **combo}, f"stage {stage!r}"):
                value_of[name] = value
        _, sup_hyps = self._eval(self._r("supervised"))
        base = self._r("baseline")
        dirs = list(next(iter(res.values())))
        lines = [f"## {var} sweep", "",
                 f"Every {var} of the sweep on the test set ({len(dirs)} directions); the choice "
                 f"(**{var}={sel['value']}**) was made on validation loss before any of these "
                 "test scores was read.", "",
                 f"| {var} | validation loss ({sel['stage']}) | average BLEU | average chrF | "
                 "chosen |", "|---|---|---|---|---|"]
        rows, sigs = [], {}
        for name in res:
            v = value_of.get(name)
            loss = sel["valid_loss"].get(str(v))
            lines.append(f"| {v} | {loss:.4f} | {_avg(res, name, dirs, 'bleu'):.2f} | "
                         f"{_avg(res, name, dirs, 'chrf'):.2f} | "
                         f"{'yes' if v == sel['value'] else ''} |")
            if base in sup_hyps:
                sig = significance({base: sup_hyps[base], name: hyps[name]}, base, dirs)[name]
                sigs[f"{name} vs {base}"] = sig
                rows.append(pooled_row(f"{name} ({var}={v}) vs {base}", sig))
        self.data["sweep"] = {"variable": var, "results": res, "significance": sigs,
                              "valid_loss": sel["valid_loss"], "chosen": sel["value"]}
        lines += ["", render_table(res, dirs), ""]
        if rows:
            lines += [*POOLED_HEAD, *rows, ""]
        return lines

    def extension(self) -> list[str]:
        ext = self._r("extension")
        new_res, new_hyps = self._eval(ext["new"])
        old_res, old_hyps = self._eval(ext["old"])
        ref = ext["reference"]
        ref_res, ref_hyps = self._eval(ext["reference_eval"])
        new_dirs = list(next(iter(new_res.values())))
        old_dirs = list(next(iter(old_res.values())))
        systems = list(new_res)
        new_base = ext.get("new_baseline", systems[0])
        lines = ["## Extension: a new pair", "",
                 f"New directions {', '.join(new_dirs)}, added by `extend` (paper mode: the new "
                 "masks and the shared parameters are trained; strict: only weights outside "
                 "every old mask, shared parameters frozen).", "",
                 "| new direction | " + " | ".join(systems) + " |",
                 "|---|" + "---|" * len(systems)]
        for d in new_dirs:
            lines.append(f"| {d} | " + " | ".join(f"{new_res[s][d]['bleu']:.1f}"
                                                 for s in systems) + " |")
        ext_sys = [s for s in old_res if s != ref]  # the reference has its own column
        lines += ["", f"| old direction | {ref} | " + " | ".join(
            f"{s} | Δ" for s in ext_sys) + " |", "|---|---|" + "---|---|" * len(ext_sys)]
        for d in old_dirs:
            b = ref_res[ref][d]["bleu"]
            cells = [f"{old_res[s][d]['bleu']:.2f} | {old_res[s][d]['bleu'] - b:+.2f}"
                     for s in ext_sys]
            lines.append(f"| {d} | {b:.2f} | " + " | ".join(cells) + " |")
        check = ext.get("check")
        if check:
            path = state_path(self.run_dir, f"{check}.json")
            with open(path) as f:
                ch = json.load(f)
            self.data["extension_weight_change"] = ch
            lines += ["", "- Largest change of any old pair's effective weight (W ⊙ M over "
                      "every old mask) and of every shared parameter: " + ", ".join(
                          f"{s} {v:.3g}" for s, v in ch.items()) + "."]
            room = self._room_outside_old_masks(self.cfg.stage(check))
            self.data["extension_room"] = room
            lines += ["- Share of the new directions' mask weights that lie outside every old "
                      "mask (all that strict mode may update; it also freezes the shared "
                      "parameters: embeddings, norms, biases): " + ", ".join(
                          f"{s} {100 * v:.2f}%" for s, v in room.items()) + "."]
        sig_old = significance({ref: ref_hyps[ref], **old_hyps}, ref, old_dirs)
        sig_new = significance(new_hyps, new_base, new_dirs)
        self.data["extension"] = {"new": new_res, "old": old_res, "significance_old": sig_old,
                                  "significance_new": sig_new}
        return lines + ["", render_significance(sig_old, ref),
                        render_significance(sig_new, new_base)]

    def _room_outside_old_masks(self, check: dict) -> dict[str, float]:
        """Per extension stage of ``check`` (a weight_change stage): the share of the new
        directions' mask weights outside the union of the old masks (``check["masks"]``)."""
        from ...bitmask import popcount
        from ...masks import MaskBank

        old = MaskBank.load(os.path.join(self.run_dir, check["masks"]))
        union = old.union(old.pairs)
        room = {}
        for stage in check["after_stages"]:
            bank = MaskBank.load(os.path.join(self.run_dir, self.cfg.stage(stage)["out"],
                                              "masks.safetensors"))
            new = [d for d in bank.pairs if d not in old.pairs]
            kept = sum(int(popcount(bank[d][n]).sum()) for d in new for n in bank.names)
            free = sum(int(popcount(bank[d][n] & ~union[n]).sum()) for d in new
                       for n in bank.names)
            room[stage] = free / max(kept, 1)
        return room

    def seeds(self) -> list[str]:
        cfg = self._r("seeds")
        pairs, evals = cfg["pairs"], cfg["eval"]
        res, hyps = {}, {}
        for e in evals:
            r, h = self._eval(e)
            res.update(r)
            hyps.update(h)
        dirs = list(next(iter(res.values())))
        lines = ["## Seeds", "", "| system | average BLEU |", "|---|---|"]
        for lass, dense in pairs:
            for s in (dense, lass):
                lines.append(f"| {s} | {_avg(res, s, dirs, 'bleu'):.2f} |")
        lines += ["", *POOLED_HEAD]
        both, sigs = {}, {}
        for lass, dense in pairs:
            sig = significance({dense: hyps[dense], lass: hyps[lass]}, dense, dirs)[lass]
            sigs[f"{lass} vs {dense}"] = sig
            lines.append(pooled_row(f"{lass} vs {dense}", sig))
            for d in dirs:
                base_h, refs = hyps[dense][d]
                both[f"{d}@{lass}"] = (base_h, hyps[lass][d][0], refs, Direction.parse(d).tgt)
        pooled = pooled_bootstrap(both)
        b = pooled["bleu"]
        lo, hi = b["delta_ci95"]
        lines.append(f"| every seed pooled ({len(both)} seed × direction sets) | "
                     f"{b['delta']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {b['p_value']:.3f} | | |")
        self.data["seeds"] = {"significance": sigs, "pooled_over_seeds": pooled}
        masks = cfg.get("masks")
        if masks and len(masks) >= 2:
            from ...masks import MaskBank

            b0, b1 = (MaskBank.load(os.path.join(self.run_dir, m)) for m in masks[:2])
            for d in b1.pairs:
                b0.add_pair(f"{d}@seed2", b1[d])
            same = {d: b0.similarity(d, f"{d}@seed2") for d in b1.pairs}
            cross = [b1.similarity(x, y) for x in b1.pairs for y in b1.pairs if x != y]
            self.data["seeds"]["similarity"] = {"same_direction_across_seeds": same,
                                                "cross_direction_second_seed": cross}
            lines += ["", f"- Same direction across the two seeds' masks: mean "
                      f"{sum(same.values()) / len(same):.4f} (" + ", ".join(
                          f"{d} {x:.3f}" for d, x in same.items()) + "); cross-direction within "
                      f"the second seed: mean {sum(cross) / max(len(cross), 1):.4f}."]
        return lines + [""]

    def similarity(self) -> list[str]:
        from ...masks import MaskBank
        from ..plots import layer_similarity_plot, similarity_heatmap

        masks = self._r("similarity_masks")
        bank = MaskBank.load(os.path.join(self.run_dir, masks))
        dirs = bank.pairs
        self.figures.append(similarity_heatmap(bank, dirs, self._png("similarity.png")))
        cross = [bank.similarity(x, y) for x in dirs for y in dirs if x != y]
        self.data["similarity"] = {"cross_direction_mean": sum(cross) / max(len(cross), 1),
                                   "cross_direction_max": max(cross, default=0.0)}
        lines = ["## Mask similarity", "",
                 f"Masks `{masks}` (LaSS Eq. 2, |M1 ∩ M2| / |M1|): cross-direction mean "
                 f"{self.data['similarity']['cross_direction_mean']:.4f}, max "
                 f"{self.data['similarity']['cross_direction_max']:.4f}.", "",
                 "![similarity](similarity.png)"]
        layer_pairs = self._r("layer_pairs")
        if layer_pairs:
            self.figures.append(layer_similarity_plot(
                bank, [tuple(p) for p in layer_pairs], self._png("layer_similarity.png")))
            lines += ["", "Per layer: ![layer similarity](layer_similarity.png)"]
        return lines + [""]

    def models(self) -> list[str]:
        folder = self._r("models")["out"]
        if not os.path.exists(os.path.join(folder, "run.json")):
            return []
        rows, total = [], 0
        for root, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    data = fh.read()
                total += len(data)
                rows.append(f"| `{os.path.relpath(path, folder)}` | {len(data) / 1e6:.2f} MB | "
                            f"`{hashlib.sha256(data).hexdigest()}` |")
        return ["## Published models", "",
                f"`{folder}/` is a run folder ({total / 1e6:.1f} MB in all) made by `lass-sparse "
                f"experiment publish {self.cfg.path}`: the best checkpoints of the published "
                "systems as bf16 safetensors, the compact mask bank, the SentencePiece model and "
                "run.json. Serve or evaluate them with `--run` pointing there. bf16 copies of the "
                "fp32 checkpoints scored above: scores can differ in the last digit.", "",
                "| file | size | sha256 |", "|---|---|---|", *rows, ""]

    # ------------------------------------------------------------------ assembly

    def markdown(self) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        lines = self.protocol() + self.convergence()
        for key in ("supervised", "sweep", "zero_shot", "extension", "seeds"):
            if self.cfg.report.get(key):
                lines += getattr(self, key)()
        if self.cfg.report.get("similarity_masks"):
            lines += self.similarity()
        if self.cfg.report.get("models"):
            lines += self.models()
        disc = self._r("discussion")
        if disc and os.path.exists(disc):
            with open(disc) as f:
                lines += [f.read().rstrip(), ""]
        return "\n".join(lines)

    def write(self) -> str:
        md = self.markdown()
        path = os.path.join(self.out_dir, f"{self.cfg.name}.md")
        atomic_write(path, md.encode())
        atomic_write(os.path.join(self.out_dir, f"{self.cfg.name}.json"),
                     json.dumps(self.data, indent=1, default=str).encode())
        return path


def write_report(cfg: Config, run_dir: str, out_dir: str | None = None) -> str:
    """Write ``OUT/<name>.md`` + ``.json`` + figures; returns the markdown's path."""
    out = out_dir or cfg.report.get("out") or os.path.join(run_dir, "results")
    return Report(cfg, run_dir, out).write()
