"""Evaluation table and image grid for the demo distillation (CPU).

    python -m xslim_lab.distill_evaluate [--runs /work/runs/distill/demo] [--images 500] [--out docs/distill]

Every row samples the same noise and labels (``--images`` / 10 per class). Metrics are in the shipped
Fashion-MNIST classifier's feature space: FD ("FD-FMNIST", not Inception FID), accuracy of the intended class,
precision/recall and within-class diversity. NFE counts full network evaluations (CFG doubles them; a cached
step counts its computed blocks / all blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from xslim_lab.demo_model.classifier import load_classifier
from xslim_lab.demo_model.grid import class_noise, images_to_grid
from xslim_lab.demo_model.latents import latent_to_image
from xslim_lab.demo_model.teacher import default_weights_path, load_teacher
from xslim_lab.metrics import DistributionMetrics
from xslim_lab.sampling import flow_sigmas, sample_euler

from distill_core.cache import CacheRange
from distill_core.runtime import STUDENT_FILE
from distill_core.student import Student, file_hash, load_student

SHIPPED = os.path.join(os.path.dirname(__file__), "weights")
# (row name, run directory name, shipped file name, cache override) in table order
STUDENT_ROWS = [
    ("plain DMD 2-step (CFG at all levels)", "dmd_plain", None, None),
    ("Stage I only, 2-step", "stage1_n2", None, None),
    ("Stage I, 2-step + plain cache reuse [4..6]", "stage1_n2", None, CacheRange(4, 6)),
    ("Stage I only, 4-step (Stage-II reference)", "stage1_n4", None, None),
    ("Stage I+II, 2-step, no cache", "stage2_full", None, None),
    ("Stage I + cache co-training [4..6] + comp. (before Stage II)", "cotrain_c175", None, None),
    ("Stage I + cache co-training [4..7] + comp. (before Stage II)", "cotrain_c167", None, None),
    ("1.x: Stage I + co-training + Stage II, cache [4..6] + comp.", "stage2_c175", "student_1x_175.safetensors", None),
    ("1.x: Stage I + co-training + Stage II, cache [4..7] + comp.", "stage2_c167", "student_1x_167.safetensors", None),
]
ONE_X_KEYS = ("cotrain_c175", "cotrain_c167", "stage2_c175", "stage2_c167")


def find_student(runs: str, run_name: str, shipped: str | None) -> str | None:
    path = os.path.join(runs, run_name, STUDENT_FILE)
    if os.path.exists(path):
        return path
    if shipped and os.path.exists(os.path.join(SHIPPED, shipped)):
        return os.path.join(SHIPPED, shipped)
    return None


TEACHER_SETTINGS = ((50, "cfg"), (4, "cfg"), (2, "cfg"), (2, None))


def teacher_rows(teacher, noise, labels, guidance: float, cache_path: str | None) -> list[tuple[str, str, float, torch.Tensor]]:
    """Teacher baselines; their latents are kept in ``cache_path`` (same noise, same settings) across runs."""
    cached = load_file(cache_path) if cache_path and os.path.exists(cache_path) else {}
    fn = teacher.velocity_fn(labels)
    rows = []
    for steps, cfg in TEACHER_SETTINGS:
        key = f"teacher{steps}" + (cfg or "")
        scale = guidance if cfg else None
        if key not in cached:
            t0 = time.time()
            cached[key] = sample_euler(fn, noise, flow_sigmas(steps), cfg_scale=scale)
            print(f"  {key}: {time.time() - t0:.0f} s", flush=True)
        name = f"teacher {steps} steps" + (f", CFG {guidance:g}" if cfg else ", no CFG")
        rows.append((name, key, steps * (2 if cfg else 1), cached[key]))
    if cache_path:
        save_file({k: v.contiguous() for k, v in cached.items()}, cache_path)
    return rows


def student_row(student: Student, cache: CacheRange | None, noise, labels) -> tuple[float, torch.Tensor]:
    if cache is not None:
        student.cache, student.compensation = cache, None  # plain reuse: an untrained compensation is identity
    return student.effective_nfe, student.sample(noise, labels)


def format_table(results: list[dict]) -> str:
    lines = ["| method | NFE | FD ↓ | accuracy ↑ | diversity ↑ | precision | recall |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['nfe']:.2f} | {r['fd']:.2f} | {r['accuracy']:.3f} | {r['diversity']:.4f} | "
                     f"{r['precision']:.2f} | {r['recall']:.2f} |")
    return "\n".join(lines)


def check_targets(results: list[dict]) -> list[str]:
    """The acceptance targets, each stated with its measured numbers and PASS/FAIL."""
    by = {r["key"]: r for r in results}
    ref, t2s = by.get("teacher50cfg"), [by[k] for k in ("teacher2cfg", "teacher2") if k in by]
    lines = []
    for key in ONE_X_KEYS:
        s = by.get(key)
        if not (s and ref):
            continue
        checks = [
            (f"accuracy within 3 points of the 100-NFE teacher ({s['accuracy']:.3f} vs {ref['accuracy']:.3f})",
             s["accuracy"] >= ref["accuracy"] - 0.03),
            (f"FD <= 1.5x teacher's ({s['fd']:.2f} vs {1.5 * ref['fd']:.2f})", s["fd"] <= 1.5 * ref["fd"]),
            (f"diversity >= 90% of teacher's ({s['diversity']:.4f} vs {0.9 * ref['diversity']:.4f})", s["diversity"] >= 0.9 * ref["diversity"]),
        ]
        for t2 in t2s:
            checks.append((f"FD better than the {t2['name']} ({s['fd']:.2f} vs {t2['fd']:.2f})", s["fd"] < t2["fd"]))
        for text, ok in checks:
            lines.append(f"- {s['name']} ({s['nfe']:.2f} NFE): {text}: **{'PASS' if ok else 'FAIL'}**")
    plain, guided = by.get("dmd_plain"), by.get("stage1_n2")
    if plain and guided:
        ok = guided["diversity"] > plain["diversity"]
        lines.append(f"- guidance control raises diversity over plain DMD ({guided['diversity']:.4f} vs "
                     f"{plain['diversity']:.4f}): **{'PASS' if ok else 'FAIL'}**")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/work/runs/distill/demo", help="directory of the demo runs")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--guidance", type=float, default=2.0, help="teacher CFG scale")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "distill"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    teacher = load_teacher()
    base_hash = file_hash(default_weights_path())
    classifier, reference = load_classifier()
    metric = DistributionMetrics(classifier, reference)
    noise, labels = class_noise(args.images // 10, seed=args.seed)
    print(f"Evaluating on {len(labels)} images (seed {args.seed})", flush=True)
    cache_path = os.path.join(args.runs, f"teacher_rows_{len(labels)}_{args.seed}_{args.guidance:g}.safetensors")
    rows = teacher_rows(teacher, noise, labels, args.guidance, cache_path if os.path.isdir(args.runs) else None)
    for name, run_name, shipped, cache in STUDENT_ROWS:
        path = find_student(args.runs, run_name, shipped)
        if path is None:
            print(f"  {name}: no student file, skipped")
            continue
        nfe, latents = student_row(load_student(path, base_hash=base_hash), cache, noise, labels)
        rows.append((name, run_name if cache is None else run_name + "+reuse", nfe, latents))
        print(f"  {name}: {path}", flush=True)
    results = []
    for name, key, nfe, latents in rows:
        images = latent_to_image(latents)
        results.append({"name": name, "key": key, "nfe": nfe, **metric(images, labels)})
    os.makedirs(args.out, exist_ok=True)
    first_per_class = torch.arange(0, len(labels), len(labels) // 10)
    second = first_per_class + 1
    picks = torch.stack([first_per_class, second], 1).flatten()
    grid = torch.cat([latent_to_image(lat[picks]) for _, _, _, lat in rows])
    images_to_grid(grid, len(rows), [str(i + 1) for i in range(len(rows))], scale=2).save(os.path.join(args.out, "grid.png"))
    table, targets = format_table(results), check_targets(results)
    header = (f"{len(labels)} images ({len(labels) // 10} per class, seed {args.seed}), same noise for every row; "
              f"teacher CFG {args.guidance:g}; metrics in the Fashion-MNIST classifier's feature space. Grid rows "
              "follow the table order (row number = table row), two samples per class.")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n\nTargets:\n\n" + "\n".join(targets) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table)
    print("\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
