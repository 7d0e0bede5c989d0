"""Ablation of the demo distillation's mechanisms on the held-out seed sets (mean ± standard error).

    python -m xslim_lab.distill_ablation [--runs DIR] [--threads 1] [--skip-train] [--only NAME ...]

Three pairs, each differing in one mechanism (run configs as in xslim_lab/distill_demo.py):

- guidance control at strong teacher CFG (w = 7): Stage I 2-step with CFG only where the shifted sigma <= 0.94
  vs CFG at every noise level (plain DMD), everything else as the demo's stage1_n2;
- co-training vs caching a finished student: the demo's cache co-training of blocks 4..6 (1.75 NFE) vs plain
  cache reuse of the same blocks on the finished 2-step Stage-I student (no training);
- Stage II on/off: the demo's Stage II from the co-trained student vs the co-trained student itself.

Runs are trained in dependency order, one at a time; a finished run is skipped and an interrupted one resumes.
Every student and the 50-step teacher (CFG 2 and CFG 7) are then measured with xslim_lab/distill_evaluate.py on
its three held-out seed sets; the table and the pairwise differences go to docs/distill/ablation.md and
docs/distill/ablation.json. A difference is called an effect when its paired mean over the sets is more than
two standard errors (of the per-set differences) from zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from distill_core.cache import CacheRange
from distill_core.config import RunConfig
from distill_core.jobfiles import METRICS, RunFolderBusy, read_json, read_metrics, write_json
from distill_core.logs import show_on_stdout
from xslim_lab.distill_demo import CACHE_175, demo_runs, finished, run_locked
from xslim_lab.metrics import mean_and_standard_error

log = logging.getLogger("xslim.distill_ablation")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = "/work/runs/ablation"
DEFAULT_OUT = os.path.join(REPO, "docs", "distill")
STRONG_CFG, SWITCH = 7.0, 0.94  # the paper's strong-guidance regime: w = 7, CFG where shifted sigma <= 0.94
TABLE_METRICS = ("fd", "accuracy", "diversity", "recall")
LOWER_IS_BETTER = {"fd"}
THRESHOLD_SE = 2.0
WALL_FILE = "ablation_wall.json"
NOTES_HEADING = "## What it says"

# (key, row name, run folder, cache override) per teacher CFG; keys are the rows the pairs name
ROWS = {
    STRONG_CFG: [
        ("w7_guided", "Stage I 2-step, w = 7, guidance control (CFG where sigma <= 0.94)", "stage1_n2_w7_a094", None),
        ("w7_plain", "plain DMD 2-step, w = 7 (CFG at every noise level)", "stage1_n2_w7_plain", None),
    ],
    2.0: [
        ("stage1_n2", "Stage I 2-step, w = 2 (the demo's)", "stage1_n2", None),
        ("reuse_c175", "Stage I 2-step + plain cache reuse [4..6], no training", "stage1_n2", CacheRange(*CACHE_175)),
        ("cotrain_c175", "Stage I + cache co-training [4..6] + comp.", "cotrain_c175", None),
        ("stage2_c175", "Stage I + co-training [4..6] + Stage II", "stage2_c175", None),
    ],
}
# (mechanism, row with it, row without it)
PAIRS = [
    ("guidance control at w = 7 (on vs off)", "w7_guided", "w7_plain"),
    ("co-training vs caching a finished student", "cotrain_c175", "reuse_c175"),
    ("Stage II (on vs off, from the co-trained student)", "stage2_c175", "cotrain_c175"),
]


def ablation_runs(out: str, threads: int = 1) -> list[RunConfig]:
    """The runs in dependency order: the two strong-CFG Stage-I runs, then the demo's runs the pairs need."""
    demo = {os.path.basename(c.run_dir): c for c in demo_runs(out)}
    base = demo["stage1_n2"]

    def strong(name: str, switch: float) -> RunConfig:
        stage1 = {**dataclasses.asdict(base.stage1), "guidance_scale": STRONG_CFG, "guidance_switch": switch}
        return dataclasses.replace(base, run_dir=os.path.join(out, name), stage1=stage1)

    runs = [strong("stage1_n2_w7_a094", SWITCH), strong("stage1_n2_w7_plain", 1.0)]
    runs += [demo[name] for name in ("stage1_n2", "cotrain_c175", "stage1_n4", "stage2_c175")]
    for cfg in runs:
        cfg.threads = threads
        # the paper's mechanisms on the paper's recipe: without the paired regression the demo adds since (the
        # measured ablation predates it; docs/DISTILL.md, "Recall")
        cfg.stage1 = dataclasses.replace(cfg.stage1, regression_weight=0.0)
    return runs


def train(cfg: RunConfig) -> dict:
    """One run as the demo trains it (its folder open from before the first write), timed."""
    t0 = time.time()
    result = run_locked(cfg)
    wall = time.time() - t0
    path = os.path.join(cfg.run_dir, WALL_FILE)
    previous = read_json(path) or {}
    write_json(path, {"seconds": previous.get("seconds", 0.0) + wall, "threads": cfg.threads})
    return result


def wall_seconds(run_dir: str) -> float | None:
    """The training wall time this script recorded, else the span of the run's metrics log."""
    recorded = read_json(os.path.join(run_dir, WALL_FILE))
    if recorded:
        return recorded["seconds"]
    records, offset, path = [], 0, os.path.join(run_dir, METRICS)
    while True:  # the log in the chunks the jobs panel reads it in
        more, offset_next = read_metrics(path, offset)
        if offset_next == offset:
            break
        records, offset = records + more, offset_next
    return records[-1]["time"] - records[0]["time"] + records[0]["elapsed_s"] if records else None


# ------------------------------------------------------------------------------------------ pairs, verdicts


def compare(with_it: dict, without_it: dict, threshold: float = THRESHOLD_SE) -> dict:
    """Per metric: the paired difference (with - without) over the sets, its standard error (of the per-set
    differences: within a set both rows sample the same noise and labels) and the verdict: "effect" when
    |mean| > threshold * s.e., else "no effect shown". Rows are evaluate()'s ``metrics`` dicts."""
    out = {}
    for key in TABLE_METRICS:
        a, b = with_it[key]["sets"], without_it[key]["sets"]
        if len(a) != len(b) or len(a) < 2:
            raise ValueError(f"{key}: the pair needs the same seed sets (at least two), got {len(a)} and {len(b)}")
        mean, se = mean_and_standard_error([x - y for x, y in zip(a, b)])
        ratio = abs(mean) / se if se > 0 else (float("inf") if mean else 0.0)
        effect = ratio > threshold
        better = (mean < 0) if key in LOWER_IS_BETTER else (mean > 0)
        out[key] = {
            "diff": mean,
            "se": se,
            "ratio": ratio,
            "effect": effect,
            "verdict": ("effect" if effect else "no effect shown"),
            "direction": ("better" if better else "worse") if effect else None,
        }
    return out


def pair_results(rows: dict[str, dict]) -> list[dict]:
    """Each mechanism's comparison, or why it is missing (a row not trained/evaluated)."""
    out = []
    for mechanism, on, off in PAIRS:
        entry = {"mechanism": mechanism, "with": on, "without": off}
        missing = [k for k in (on, off) if k not in rows]
        if missing:
            entry["missing"] = missing
        else:
            entry["metrics"] = compare(rows[on]["metrics"], rows[off]["metrics"])
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------- tables

FORMATS = {"fd": ".2f", "accuracy": ".3f", "diversity": ".4f", "recall": ".3f"}


def _pm(metric: dict, key: str) -> str:
    f = FORMATS[key]
    return f"{format(metric['mean'], f)} ± {format(metric['se'], f)}"


def format_table(rows: list[dict]) -> str:
    lines = ["| row | NFE | FD ↓ | accuracy ↑ | diversity ↑ | recall ↑ |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['nfe']:.2f} | " + " | ".join(_pm(r["metrics"][k], k) for k in TABLE_METRICS) + " |"
        )
    return "\n".join(lines)


def format_per_set(rows: list[dict], seeds: list[int]) -> str:
    head = " / ".join(map(str, seeds))
    lines = [f"| row | FD (seeds {head}) | accuracy | diversity | recall |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [" / ".join(format(v, FORMATS[k]) for v in r["metrics"][k]["sets"]) for k in TABLE_METRICS]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_notes(path: str) -> str:
    """The hand-written part of an existing ablation.md (from its NOTES_HEADING on), kept across reruns."""
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        text = f.read()
    at = text.find(NOTES_HEADING)
    return "\n" + text[at:].rstrip() + "\n" if at >= 0 else ""


def format_pairs(pairs: list[dict], names: dict[str, str]) -> str:
    lines = []
    for p in pairs:
        head = f"- **{p['mechanism']}** ({names.get(p['with'], p['with'])} − {names.get(p['without'], p['without'])})"
        if "missing" in p:
            lines.append(f"{head}: not measured (rows not run: {', '.join(p['missing'])})")
            continue
        parts = []
        for key in TABLE_METRICS:
            m, f = p["metrics"][key], FORMATS[key]
            what = f"**effect** ({m['direction']})" if m["effect"] else "no effect shown"
            parts.append(f"{key} {format(m['diff'], '+' + f)} ± {format(m['se'], f)} ({m['ratio']:.1f} s.e.): {what}")
        lines.append(f"{head}: " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- run


def published_teacher(path: str | None, guidance: float, seeds: list[int], images: int, steps: int) -> dict | None:
    """The teacher row of an earlier distill_evaluate results.json measured on the same seed sets, image count
    and teacher CFG (the 50-step teacher's rows do not depend on any student), else None."""
    data = read_json(path) if path else None
    if not data or data.get("seeds") != seeds or data.get("images") != images or data.get("guidance") != guidance:
        return None
    row = next((r for r in data["rows"] if r["key"] == f"teacher{steps}cfg"), None)
    return {**row, "source": os.path.relpath(path, REPO)} if row else None


def evaluate_all(
    runs: str, cache_dir: str, teacher_steps: int, published: str | None = None, groups: list[float] | None = None
) -> tuple[list[dict], list[int]]:
    """Every row on the three held-out seed sets, one evaluate() per teacher CFG (its teacher row included,
    taken from ``published`` where that file measured it on the same sets)."""
    from xslim_lab import distill_evaluate as ev  # heavy imports (teacher, classifier) only when evaluating

    rows, seeds = [], ev.set_seeds(ev.DEFAULT_SEED, ev.DEFAULT_SETS)
    for guidance, specs in ROWS.items():
        if groups and guidance not in groups:
            continue
        known = published_teacher(published, guidance, seeds, ev.DEFAULT_IMAGES, teacher_steps)
        result = ev.evaluate(
            runs=runs,
            guidance=guidance,
            cache_dir=cache_dir,
            teacher_settings=() if known else ((teacher_steps, "cfg"),),
            student_rows=[(name, run, None, cache) for _, name, run, cache in specs],
            reference_key=f"teacher{teacher_steps}cfg",
        )
        keys = {(run if cache is None else run + "+reuse"): key for key, _, run, cache in specs}
        if known:
            log.info("teacher row at CFG %g from %s (same seed sets)", guidance, known["source"])
            name = f"{known['name']} (measured by distill_evaluate on these sets: {known['source']})"
            rows.append(
                {**known, "name": name, "key": f"teacher{teacher_steps}cfg_w{guidance:g}", "guidance": guidance}
            )
        for r in result["rows"]:
            key = keys.get(r["key"], f"{r['key']}_w{guidance:g}")
            rows.append({**r, "key": key, "guidance": guidance})
        log.info("evaluated the CFG-%g rows in %.0f s", guidance, result["seconds"])
    return rows, seeds


def write_outputs(
    rows: list[dict], seeds: list[int], pairs: list[dict], walls: dict, out: str, teacher_steps: int
) -> str:
    os.makedirs(out, exist_ok=True)
    names = {r["key"]: r["name"] for r in rows}
    wall_lines = [f"- {name}: {s / 60:.1f} min" if s is not None else f"- {name}: not run" for name, s in walls.items()]
    md = (
        f"# Ablation: each mechanism of the demo distillation\n\n"
        f"Made by `python -m xslim_lab.distill_ablation`. {len(seeds)} held-out seed sets (seeds "
        f"{', '.join(map(str, seeds))}) of 200 images each (20 per class), the same noise for every row within a set; "
        f"metrics of xslim_lab/distill_evaluate.py (Fashion-MNIST classifier feature space; recall against real "
        f"test images, k = 3). Mean ± standard error over the sets. Teacher rows: {teacher_steps} Euler steps.\n\n"
        + format_table(rows)
        + f"\n\nDifference vs its pair (with − without; paired over the sets, ± s.e. of the per-set differences; "
        f'"effect" when |difference| > {THRESHOLD_SE:g} s.e.):\n\n'
        + format_pairs(pairs, names)
        + "\n\nTraining wall time per run (1 torch thread, a 2-core machine shared with other work):\n\n"
        + "\n".join(wall_lines)
        + "\n\nPer set:\n\n"
        + format_per_set(rows, seeds)
        + "\n"
    )
    md += kept_notes(os.path.join(out, "ablation.md"))
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(
            {
                "seeds": seeds,
                "teacher_steps": teacher_steps,
                "threshold_se": THRESHOLD_SE,
                "rows": rows,
                "pairs": pairs,
                "training_wall_s": walls,
            },
            f,
            indent=1,
        )
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="folder of the ablation's run folders (made if missing)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="where ablation.md and ablation.json go (default: docs/distill)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    parser.add_argument("--only", nargs="*", help="train only these run names (evaluation takes every finished run)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the finished runs only")
    parser.add_argument("--skip-eval", action="store_true", help="train only")
    parser.add_argument("--teacher-steps", type=int, default=50, help="Euler steps of the teacher rows (default 50)")
    parser.add_argument(
        "--cache-dir", default=None, help="teacher rows kept between runs (default: RUNS/teacher_cache)"
    )
    parser.add_argument(
        "--published",
        default=os.path.join(DEFAULT_OUT, "seedsets", "results.json"),
        help="an earlier xslim_lab/distill_evaluate.py results.json: its teacher row is used where it "
        "was measured on the same seed sets and CFG (default: docs/distill/seedsets/results.json; '' "
        "samples every teacher row)",
    )
    parser.add_argument(
        "--cfg",
        type=float,
        nargs="*",
        help=f"evaluate only the rows of these teacher CFGs ({', '.join(f'{g:g}' for g in ROWS)})",
    )
    args = parser.parse_args(argv)
    show_on_stdout()
    walls = {}
    for cfg in ablation_runs(args.runs, args.threads):
        name = os.path.basename(cfg.run_dir)
        if not args.skip_train and (not args.only or name in args.only) and not finished(cfg):
            log.info("%s: training", name)
            try:
                result = train(cfg)
            except RunFolderBusy as err:
                log.error("%s; nothing in it was changed.", err)
                return 2
            log.info("%s: %s at iteration %s", name, result["status"], result["iteration"])
            if result["status"] != "done":
                return 1
        walls[name] = wall_seconds(cfg.run_dir) if finished(cfg) else None
    if args.skip_eval:
        return 0
    import torch

    torch.set_num_threads(max(1, args.threads))
    cache_dir = args.cache_dir or os.path.join(args.runs, "teacher_cache")
    rows, seeds = evaluate_all(args.runs, cache_dir, args.teacher_steps, args.published or None, args.cfg)
    pairs = pair_results({r["key"]: r for r in rows})
    print(write_outputs(rows, seeds, pairs, walls, args.out, args.teacher_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
