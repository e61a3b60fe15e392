"""What stage_one.py reports: its figures from the raw measurements, the issue's targets, the printed table.

    result = {**speed_figures(tops, smalls, bases, big, tops_large), **memory_figures(small, big, model), ...}
    result["targets"] = targets(result)
    print(table_text(result))
"""
import numpy as np

from measure import describe_cpu  # a sibling: stage_one.py puts this folder on sys.path

TARGETS = {"ratio_vs_ceiling": 0.80, "ratio_vs_ceiling_large": 0.90, "ratio_vs_baseline": 3.0, "rss_growth": 0.15}


def speed_figures(tops, smalls, bases, big=None, tops_large=()):
    """Rates and ratios: the pipeline's mean rate over its runs against the mean of the ceilings
    measured before, between and after them, and against the mean of the tutorial loop's runs (before
    and after all of them); `big` (the long run, only when it ran the same model) against the mean of
    `tops_large`, the ceilings just before and after it."""
    ceiling_rate = float(np.mean(tops))
    pipeline_rate = float(np.mean([small["images_per_s"] for small in smalls]))
    baseline_rate = float(np.mean([base["images_per_s"] for base in bases]))
    return {"ceiling_img_s": round(ceiling_rate, 2), "pipeline_img_s": round(pipeline_rate, 2),
            "baseline_img_s": round(baseline_rate, 2),
            "baseline_runs_img_s": [round(base["images_per_s"], 2) for base in bases],
            "ratio_vs_ceiling": round(pipeline_rate / ceiling_rate, 3),
            "ratio_vs_baseline": round(pipeline_rate / baseline_rate, 3),
            "ceiling_runs_img_s": [round(t, 2) for t in tops],
            "pipeline_runs_img_s": [round(small["images_per_s"], 2) for small in smalls],
            "pipeline_inner_img_s": round(float(np.mean([small["inner_images_per_s"] for small in smalls])), 2),
            "pipeline_large_img_s": big and round(big["images_per_s"], 2),
            "ceiling_large_runs_img_s": big and [round(t, 2) for t in tops_large],
            "ratio_vs_ceiling_large": big and round(big["images_per_s"] / float(np.mean(tops_large)), 3),
            **cpu_figures([*smalls, *([big] if big else [])])}


def cpu_figures(extracts):
    """Each extract's own CPU per image and the host's steal and other processes' shares while it ran
    (measure.cpu_use), and the share of its time the model waited for decoded images, in the order run: the
    384-image runs, then the long run."""
    return {f"extract_{key}": [run.get(key) for run in extracts]
            for key in ("cpu_ms_per_image", "steal", "others", "waited_share")}


def forward_shares(result):
    """On a CPU: the share of each extract's own CPU per image that the forward pass needs at the ceiling's
    rate (its threads over the ceiling around that extract). With every core busy an extract's ratio to the
    ceiling is that share: the rest went to decoding, start-up and writing, and a ratio below it is time
    the cores waited. None on a GPU, where the forward pass runs elsewhere, or without CPU figures."""
    cpu = result["extract_cpu_ms_per_image"]
    if result["device"] != "cpu" or not cpu or None in cpu:
        return None
    ceilings = [result["ceiling_img_s"]] * len(result["pipeline_runs_img_s"])
    if result["pipeline_large_img_s"]:
        ceilings.append(float(np.mean(result["ceiling_large_runs_img_s"])))
    forward_ms = [1000 * result["machine"]["threads"] / ceiling for ceiling in ceilings]
    return [round(forward / used, 3) for forward, used in zip(forward_ms, cpu)]


def memory_figures(small, big, large_model):
    """Peak memory on N images and on the long run's, both runs with `large_model`."""
    return {"rss_small_mb": round(small["maxrss_mb"], 1), "rss_large_mb": round(big["maxrss_mb"], 1),
            "rss_growth": round(big["maxrss_mb"] / small["maxrss_mb"] - 1, 4),
            "rss_images_small": small["images"], "rss_images_large": big["images"], "rss_model": large_model,
            "rss_what": "peak RSS (VmHWM) of a fresh extract process; tree_pss: it and its decode workers, sampled "
                        "in an untimed run of the same extract (only when it has workers)",
            "tree_pss_small_mb": small.get("tree_pss_mb") and round(small["tree_pss_mb"], 1),
            "tree_pss_large_mb": big.get("tree_pss_mb") and round(big["tree_pss_mb"], 1)}


def bf16_figures(similarity, compared, scores):
    """What bf16 changes: in the codes, and (when measured) in vehicles test accuracy; the fast recipe's
    vehicles figures. `similarity` None: bf16 not measured (its figures None)."""
    bf16 = similarity is not None
    with_bf16 = scores if scores and scores["cosine"] is not None else None
    return {"bf16_cosine_mean": round(float(similarity.mean()), 6) if bf16 else None,
            "bf16_cosine_min": round(float(similarity.min()), 6) if bf16 else None, "bf16_cosine_images": compared,
            "vehicles_softmax_test_acc_fp32": scores and round(scores["fp32"], 4),
            "vehicles_softmax_test_acc_bf16": with_bf16 and round(scores["bf16"], 4),
            "vehicles_softmax_test_acc_delta_points": with_bf16 and round(100 * (scores["bf16"] - scores["fp32"]), 2),
            "vehicles_bf16_cosine_mean": with_bf16 and round(float(scores["cosine"].mean()), 6),
            "vehicles_bf16_cosine_min": with_bf16 and round(float(scores["cosine"].min()), 6),
            "vehicles_softmax_test_acc_fp32_reference": scores and round(scores["fp32-reference"], 4),
            "vehicles_fast_cosine_min": scores and round(float(scores["reference_cosine"].min()), 6),
            **device_figures(scores)}


def device_figures(scores):
    """What decoding on the device changes in vehicles test accuracy and the codes (None: not measured)."""
    device = scores.get("device_cosine") if scores else None
    return {"vehicles_softmax_test_acc_fp32_device": round(scores["fp32-device"], 4) if device is not None else None,
            "vehicles_device_cosine_min": round(float(device.min()), 6) if device is not None else None}


def targets(result):
    """Each target with whether `result` met it: None when the figure was not measured (the long run
    with another model has no ratio). The 3x line over the tutorial loop is meant for CPUs with
    native bf16 (the issue's words): elsewhere on a CPU it is marked `applies: False`."""
    def met(key, value, target):
        if value is None:
            return None
        return abs(value) <= target if key == "rss_growth" else value >= target
    native = result["device"] != "cpu" or result["machine"]["native_cpu_bf16"]
    return {key: {"target": target, "met": met(key, result[key], target),
                  "applies": native or key != "ratio_vs_baseline"} for key, target in TARGETS.items()}


def cpu_text(r):
    """The extracts' CPU line: their own CPU per image, and what the host and other processes took meanwhile."""
    share = lambda values: ", ".join("?" if v is None else f"{100 * v:.1f}%" for v in values)
    shares = r.get("forward_cpu_share")
    return (f"  {'cpu':<9} each extract's own CPU per image "
            f"{', '.join(f'{v:.1f}' for v in r['extract_cpu_ms_per_image'])} ms; while they ran, the host stole "
            f"{share(r['extract_steal'])} of the machine and other processes used {share(r['extract_others'])}"
            + (f"; the forward pass's share of it at the ceiling's rate {', '.join(f'{v:.3f}' for v in shares)} "
               "(the most each ratio can be with every core busy)" if shares else "")
            + (f"; the model waited for decoded images {share(r['extract_waited_share'])} of each"
               if r.get("extract_waited_share") and None not in r["extract_waited_share"] else ""))


def bf16_text(r):
    """The bf16 line: how close its codes came to fp32's, or why it was not measured."""
    if r["bf16_not_measured"] == "--no-bf16":
        return f"  {'bf16':<9} not measured (--no-bf16)"
    if r["bf16_not_measured"]:
        return (f"  {'bf16':<9} not measured: this {'CPU' if r['device'] == 'cpu' else 'GPU'} runs no bf16 "
                f"natively, so PRECISION=auto runs {r['precision']} (stage_one.py --bf16 measures it)")
    return (f"  {'bf16':<9} cosine to fp32 codes: mean {r['bf16_cosine_mean']:.5f}, min {r['bf16_cosine_min']:.5f} "
            f"({r['bf16_cosine_images']} images)")


def table_text(r):
    """The printed summary of a bench result."""
    m, t = r["machine"], r["targets"]
    verdict = lambda key: (f"target {t[key]['target']}: {'met' if t[key]['met'] else 'NOT met'}" if t[key]["applies"]
                           else f"target {t[key]['target']} is for CPUs with native bf16: none here")
    rate = lambda name, what, value, note="": f"  {name:<9} {what:<41} {value:7.2f} img/s   {note}".rstrip()
    lines = [
        f"stage-one bench: {r['model']} ({'random' if r['weights'] == 'none' else r['weights']} weights), "
        f"{r['precision']} {r['memory_format']}, batch {r['batch_size']}, "
        f"{str(r['workers']) + ' worker processes' if r['workers'] else 'decoding between forward passes'}, "
        f"decoded on the {'device' if r['decode'] == 'device' else 'CPU'}, "
        f"{'through torch.compile, ' if r.get('compiled') else ''}"
        f"{r['images']} JPEGs ({' and '.join(r['image_sizes'])}, q{r['jpeg_quality']}, {r['corpus_mb']} MB)",
        f"machine: {describe_cpu(m)}, {m['threads']} threads, torch {m['torch']}"
        f"{', ' + m['gpu'] if m['gpu'] else ''}; load average {r['load_average']}",
        "",
        rate("ceiling", "forward pass only, batches in memory", r["ceiling_img_s"],
             f"mean of {', '.join(map(str, r['ceiling_runs_img_s']))}"),
        rate("pipeline", "extract, files -> HDF5, fresh process", r["pipeline_img_s"],
             f"{r['ratio_vs_ceiling']:.3f} x ceiling ({verdict('ratio_vs_ceiling')}); "
             f"mean of {', '.join(map(str, r['pipeline_runs_img_s']))}"),
        r["pipeline_large_img_s"] and rate("", f"the same on {r['rss_images_large']} images", r["pipeline_large_img_s"],
                                           f"{r['ratio_vs_ceiling_large']:.3f} x ceiling "
                                           f"({verdict('ratio_vs_ceiling_large')}); ceilings around it "
                                           f"{', '.join(map(str, r['ceiling_large_runs_img_s']))}"),
        rate("baseline", "tutorial loop (fp32, batch 4, 4 workers)", r["baseline_img_s"],
             f"pipeline {r['ratio_vs_baseline']:.3f} x baseline ({verdict('ratio_vs_baseline')}); "
             f"mean of {', '.join(map(str, r['baseline_runs_img_s']))}"),
        cpu_text(r),
        f"  {'memory':<9} extract peak RSS ({r['rss_model']}): "
        f"{r['rss_images_small']} images {r['rss_small_mb']:.0f} MB, "
        f"{r['rss_images_large']} images {r['rss_large_mb']:.0f} MB, {100 * r['rss_growth']:+.1f}% "
        f"(within {100 * t['rss_growth']['target']:.0f}%: {'met' if t['rss_growth']['met'] else 'NOT met'})"
        + (f"; with workers (PSS) {r['tree_pss_small_mb']:.0f} / {r['tree_pss_large_mb']:.0f} MB"
           if r["tree_pss_small_mb"] else ""),
        bf16_text(r),
    ]
    if r["vehicles_softmax_test_acc_bf16"] is not None:
        lines.append(f"  {'':<9} vehicles softmax test accuracy: fp32 {r['vehicles_softmax_test_acc_fp32']:.4f}, "
                     f"bf16 {r['vehicles_softmax_test_acc_bf16']:.4f} "
                     f"({r['vehicles_softmax_test_acc_delta_points']:+.2f} points); MobileNetV2 codes of bf16 to "
                     f"fp32: cosine mean {r['vehicles_bf16_cosine_mean']:.5f}, min {r['vehicles_bf16_cosine_min']:.5f}")
    st = r["steps_ms"]
    lines.append(f"  {'steps':<9} ms per image, one thread: decode {st['decode']:.2f}; torchvision's recipe: resize "
                 f"{st['resize']:.2f}, crop {st['crop']:.2f}, to tensor {st['to_tensor']:.2f}, normalise "
                 f"{st['normalise']:.2f} (with decode {st['reference_total']:.2f}); fast: one resize to uint8 "
                 f"{st['fast_resize_crop_to_uint8']:.2f}, collate per batch {st['fast_collate_per_batch']:.2f}, "
                 f"normalise per batch {st['fast_normalise_per_batch']:.2f} (with decode {st['fast_total']:.2f})")
    on_device = r.get("device_steps_ms")
    if on_device:
        lines.append(f"  {'':<9} decoded on {r['device']}, {on_device['jpegs']} JPEGs to a call: ms per image "
                     f"{on_device['decode']:.4f}, with resize and crop {on_device['decode_resize_crop']:.4f} "
                     f"({1e3 / on_device['decode_resize_crop']:.0f} img/s)")
    lines += fidelity_lines(r)
    lines.append(f"  {'start-up':<9} build {r['startup_build_s']:.2f} s, trace {r['startup_trace_s']:.2f} s, prepare "
                 f"{r['startup_prepare_s']:.2f} s, first batch {r['startup_first_batch_s']:.2f} s (a later batch "
                 f"{r['steady_batch_s']:.2f} s)")
    lines.append(f"  ({r['seconds']:.0f} s in all)")
    return "\n".join(line for line in lines if line is not None)


def fidelity_lines(r):
    """The fast recipe's codes against torchvision's, and on vehicles what the recipe and (when measured)
    decoding on the device change in accuracy and codes."""
    lines = []
    lines.append(f"  {'fidelity':<9} codes of the fast recipe against torchvision's: cosine mean "
                 f"{r['fast_cosine_mean']:.6f}, min {r['fast_cosine_min']:.6f} ({r['fast_cosine_images']} images)")
    if r["vehicles_softmax_test_acc_fp32_reference"] is not None:
        lines.append(f"  {'':<9} vehicles softmax test accuracy, fp32: fast {r['vehicles_softmax_test_acc_fp32']:.4f}, "
                     f"torchvision's recipe {r['vehicles_softmax_test_acc_fp32_reference']:.4f}; MobileNetV2 codes "
                     f"cosine min {r['vehicles_fast_cosine_min']:.6f}")
    if r.get("vehicles_softmax_test_acc_fp32_device") is not None:
        lines.append(f"  {'':<9} vehicles softmax test accuracy, fp32: decoded on the CPU "
                     f"{r['vehicles_softmax_test_acc_fp32']:.4f}, on the device "
                     f"{r['vehicles_softmax_test_acc_fp32_device']:.4f}; MobileNetV2 codes cosine min "
                     f"{r['vehicles_device_cosine_min']:.6f}")
    return lines
