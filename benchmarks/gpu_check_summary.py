"""Collect what benchmarks/gpu_check.sh measured into one JSON and print it as a table.

    python benchmarks/gpu_check_summary.py WORK OUT.json [LOG]

WORK is the check's working folder (steps.tsv, the benchmarks' JSON files, the run folders).
Standard library only, and every input is optional: the summary is rewritten after each step, so
a check cut short still returns what it measured.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _steps(work: Path) -> dict[str, dict]:
    steps = {}
    try:
        rows = (work / "steps.tsv").read_text().splitlines()
    except OSError:
        rows = []
    for row in rows:
        name, rc, seconds = row.split("\t")
        steps[name] = {"exit": int(rc), "seconds": int(seconds)}
    return steps


def _pick(d: dict | None, *keys: str) -> dict:
    return {k: d.get(k) for k in keys} if d else {}


def detection_run(out: Path, skip: int = 20) -> dict:
    """s/iter of a train_net run (detectron2's metrics.json 'time' after ``skip`` iterations) and
    the headline metrics of its results.json."""
    rows = [r for r in _jsonl(out / "metrics.json") if "time" in r]
    late = [r["time"] for r in rows if r.get("iteration", 0) >= skip] or [r["time"] for r in rows]
    data = [r["data_time"] for r in rows if r.get("iteration", 0) >= skip and "data_time" in r]
    res = _json(out / "results.json") or {}
    metrics = res.get("metrics") or {}
    head = {
        task: {k: v for k, v in m.items() if k in ("AP", "AP50", "AP75")}
        for task, m in metrics.items()
        if isinstance(m, dict)
    }
    return {
        "s_per_iter": round(statistics.median(late), 4) if late else None,
        "data_s_per_iter": round(statistics.median(data), 4) if data else None,
        "iterations": res.get("iteration"),
        "ims_per_batch": res.get("ims_per_batch"),
        "min_size_train": res.get("min_size_train"),
        "min_size_test": res.get("min_size_test"),
        "wall_time_s": res.get("wall_time_s"),
        "metrics": head,
    }


def pretraining_run(out: Path, log: str) -> dict:
    train = [r for r in _jsonl(out / "log.jsonl") if r.get("type") == "train"]
    its = [r["iteration"] for r in train]
    return {
        "iterations_logged": its,
        "final_loss": train[-1]["loss"] if train else None,
        "resumed_line": next((x for x in log.splitlines() if x.startswith("resumed from")), None),
        "process_group_line": next(
            (x for x in log.splitlines() if "process group" in x and "joined" in x), None
        ),
    }


def collect(work: Path, log_path: Path | None = None) -> dict[str, Any]:
    """Everything the check measured; ``log_path``: its log (for the pretraining lines)."""
    try:
        log = log_path.read_text(errors="replace") if log_path else ""
    except OSError:
        log = ""
    try:
        gpu = (work / "gpu.txt").read_text().strip()
    except OSError:
        gpu = "cpu (smoke run)"
    try:
        versions = (work / "versions.txt").read_text().strip()
    except OSError:
        versions = None
    losses = _json(work / "mcl_losses.json")
    r18, r50 = _json(work / "cohort_r18.json"), _json(work / "cohort_r50.json")
    cohort_keys = (
        "arch",
        "batch",
        "step_s_single",
        "step_s_cohort",
        "step_time_ratio",
        "peak_mem_mib_single",
        "peak_mem_mib_cohort",
        "peak_mem_ratio",
        "mcl_terms_share_of_cohort_step",
        "mcl_terms_share_of_single_step",
        "step_s_cohort_without_interaction",
        "interaction_terms_in_step_s",
        "interaction_terms_share_of_single_step",
    )
    result = {
        "format": "mcl_det.gpu_check/v1",
        "gpu": gpu,
        "versions": versions,
        "steps": _steps(work),
        "mcl_terms": _pick(
            losses,
            "loss_ms",
            "moco_r18_step_ms",
            "ratio",
            "ratio_min",
            "vcl_only_ratio",
            "compiled_ratio",
            "ratio_vs_plain_r18",
            "ops",
        )
        | {"target": "< 0.05"},
        "cohort_r18_b32": _pick(r18, *cohort_keys) | {"targets": "time <= 2.05, memory <= 2.1"},
        "cohort_r50_b64": _pick(r50, *cohort_keys),
        "throughput_r50x2_bf16_cl_b128": _pick(
            _json(work / "throughput.json"), "images_per_s", "step_s_median", "peak_mem_gib"
        ),
        "feed_r50x2_bf16_b128": _pick(
            _json(work / "feed.json"),
            "real_jpegs_images_per_s",
            "synthetic_images_per_s",
            "real_over_synthetic",
            "real_data_wait_s",
            "device_stage_ms_per_batch",
            "device_stage_top_cuda_ops",
            "workers",
            "cpu_count",
            "pipeline",
        )
        | {"target": ">= 0.9"},
        "pretrain_torchrun_amp_resume": pretraining_run(work / "pretrain_r50x2", log),
        "toy_voc_faster_rcnn_r18_fpn_amp": detection_run(work / "det_toy_voc"),
        "toy_coco_mask_rcnn_r18_fpn_amp": detection_run(work / "det_toy_coco"),
        "voc_r50_c4_full_size_b2_fp32": detection_run(work / "det_voc_r50c4"),
        "voc_r50_c4_full_size_b2_amp": detection_run(work / "det_voc_r50c4_amp"),
        "detectron2_reference": "0.537 s/iter, VOC R50-C4, 8 V100 at 2 images per GPU",
    }
    return result


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    result = collect(work, Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
