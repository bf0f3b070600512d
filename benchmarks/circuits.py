"""Circuits on SmolLM2-135M-Instruct, end to end on 2 CPU cores: train skip transcoders for all 30 layers from
the default corpus in one streamed pass, score them (per-layer FVU of the MLP output; the replacement model
with all 30 at once: next-token CE and KL to the real model on held-out text), then trace 20 prompts
(factual recall, induction/copying, arithmetic, rhymes) and report per graph: replacement and completeness
scores, size after pruning, seconds, and the ablation checks in the real model (correlation of measured with
predicted effects; the target logit's drop for the top-10 graph features against 10 random active features
of matched total activation; the top 10 are those the graph says support the target most). circuit-tracer (0.5, ``.ct-venv``, ``benchmarks/circuit_tracer_side.py``)
traces the same ids with the same transcoders in the same run: its time, ours, and the largest adjacency
difference.

    .venv/bin/python benchmarks/circuits.py [--steps 400] [--out /tmp/bench_circ] [--quick]

Training is resumable (rerun the same command). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS: list[tuple[str, str]] = [
    ("factual", "The capital of France is"),
    ("factual", "The Eiffel Tower is located in the city of"),
    ("factual", "Michael Jordan played the sport of"),
    ("factual", "The largest planet in the solar system is"),
    ("factual", "The chemical symbol for gold is"),
    ("induction", "Mr. Dursley and Mrs. Dursley went home. Mr. and Mrs."),
    ("induction", "The code word is banana. I repeat, the code word is"),
    ("induction", "alpha beta gamma delta alpha beta gamma"),
    ("induction", "John gave Mary the book. Then Mary gave John the"),
    ("induction", "red green blue red green blue red green"),
    ("arithmetic", "2 + 2 ="),
    ("arithmetic", "3 + 5 ="),
    ("arithmetic", "10 - 4 ="),
    ("arithmetic", "7 + 6 ="),
    ("arithmetic", "36 + 59 ="),
    ("rhyme", "Twinkle, twinkle, little star, how I wonder what you"),
    ("rhyme", "Roses are red, violets are"),
    ("rhyme", "Humpty Dumpty sat on a wall, Humpty Dumpty had a great"),
    ("rhyme", "Jack and Jill went up the"),
    ("rhyme", "Hickory dickory dock, the mouse ran up the"),
]
TIMING_TEXT = "The Eiffel Tower is in Paris, the Colosseum is in Rome and Big Ben is in London, so"


def train(out: Path, steps: int, width: int, k: int, arch: str) -> float:
    """Run (or resume) the layer-set training; 0 seconds when every layer's transcoder already has ``steps``.
    Per-layer sets are skip transcoders; a CLT (``--arch clt``) has no skip path (circuit-tracer 0.5 loads none
    for a CLT, and the side-by-side needs its layout)."""
    clt = arch == "clt"
    pattern = f"{arch}-w{width}-k{k}/cfg.json" if clt else f"L*/{arch}-w{width}-k{k}-skip/cfg.json"
    done = [json.loads(c.read_text()).get("featurelens", {}).get("extra", {}).get("trained_steps")
            for c in out.glob(pattern)]
    if done and (clt or len(done) == len(list(out.glob("L*")))) and all(d == steps for d in done):
        return 0.0
    cmd = [str(ROOT / ".venv/bin/featurelens"), "train", "--model", "smollm2-135m-instruct", "--layers", "all",
           "--site", "ln2.hook_normalized", "--target-site", "hook_mlp_out", "--arch", arch, "--k", str(k),
           "--width", str(width), *([] if clt else ["--skip"]), "--steps", str(steps), "--batch-size", "512",
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"training failed (status {status})")
    (out / "train_peak_rss.json").write_text(json.dumps({"peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}))
    return time.perf_counter() - t0


def peak_gib(out: Path) -> float | None:
    """The training process's peak resident memory, from the ``peak_rss_gib`` its run wrote (None if unknown)."""
    f = out / "train_peak_rss.json"
    return json.loads(f.read_text()).get("peak_rss_gib") if f.is_file() else None


def ct_model_folder(src: Path, dst: Path) -> Path:
    """A copy of the converted SmolLM2 folder that transformers 4.57 (circuit-tracer's pin) reads: the same
    weights (linked), ``rope_theta`` at the top level, the tokenizer as PreTrainedTokenizerFast."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json") and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg["rope_scaling"] = None
    (dst / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


def replacement_metrics(lm: Any, tcs: list[Any], n_tokens: int) -> dict[str, Any]:
    from featurelens.data.corpora import iter_texts
    from featurelens.data.tokenize import pack_contexts
    from featurelens.evaluation.replacement import transcoder_metrics

    c = pack_contexts(iter_texts("default", "test"), lm.tokenizer, 128, n_tokens=n_tokens)
    ids, keep = torch.as_tensor(c.tokens).long(), torch.as_tensor(c.keep)
    batches = [(ids[i:i + 8], keep[i:i + 8]) for i in range(0, len(ids), 8)]
    return transcoder_metrics(lm.model, tcs, batches)


def side_by_side(lm: Any, tcs: list[Any], out: Path, n_prompts: int) -> tuple[float, dict[str, Any]]:
    """Ours and circuit-tracer's graph of the 16-token timing prompt and the first ``n_prompts`` prompts:
    seconds of each, the ratio, whether the features and logits agree, the largest adjacency difference."""
    from featurelens.circuits.graph import attribute
    from featurelens.circuits.run import prompt_ids
    from featurelens.saes.circuit_tracer import save_circuit_tracer, save_circuit_tracer_clt
    from featurelens.saes.clt import CrossLayerTranscoder

    # the 16-token timing prompt, ours and circuit-tracer's, plus the first --ct-prompts prompts
    t_ids = [int(lm.tokenizer.bos_token_id), *lm.tokenizer(TIMING_TEXT, add_special_tokens=False)["input_ids"][:15]]
    ct_ids = [t_ids] + [prompt_ids(lm.tokenizer, t, True).tolist() for _, t in PROMPTS[:n_prompts]]
    ours_t, ours_g = [], []
    for ids in ct_ids:
        g = attribute(lm.model, tcs, torch.tensor(ids), progress=False)
        ours_t.append(g.meta["seconds"])
        ours_g.append(g)
    ct: dict[str, Any] = {"available": False}
    ct_py = ROOT / ".ct-venv/bin/python"
    if ct_py.exists():
        clt = tcs[0] if isinstance(tcs[0], CrossLayerTranscoder) else None
        set_dir = (save_circuit_tracer_clt(clt, out / "ct-set", overwrite=True) if clt is not None else
                   save_circuit_tracer(tcs, out / "ct-set", overwrite=True))
        src = next(Path(os.path.expanduser("~/.cache/featurelens/converted")).glob("SmolLM2-135M-Instruct*"))
        folder = ct_model_folder(src, out / "ct-model")
        res = subprocess.run([str(ct_py), str(ROOT / "benchmarks/circuit_tracer_side.py"), "--model", str(folder),
                              "--transcoders", str(set_dir), "--ids", json.dumps(ct_ids), "--out", str(out / "ct-graph")],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode == 0:
            from safetensors.torch import load_file

            theirs_t = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
            errs, same = [], []
            for j, g in enumerate(ours_g):
                t = load_file(str(out / f"ct-graph{j}.safetensors"))
                same.append(bool(torch.equal(t["active_features"], g.active_features)
                                 and t["logit_tokens"].tolist() == g.logit_tokens.tolist()))
                if t["adjacency"].shape == g.adjacency.shape:
                    errs.append(float((t["adjacency"] - g.adjacency).abs().max() / t["adjacency"].abs().max()))
            ct = {"available": True, "seconds": [round(s, 1) for s in theirs_t], "ours_seconds": [round(s, 1) for s in ours_t],
                  "ratio_ours_over_theirs": [round(a / b, 3) for a, b in zip(ours_t, theirs_t)],
                  "same_features_and_logits": same, "adjacency_max_rel_diff": errs}
        else:
            ct = {"available": False, "error": res.stderr.strip().splitlines()[-1:] if res.stderr else "failed"}
    return round(ours_t[0], 1), ct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_circ")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--arch", default="batchtopk", help="batchtopk maps to circuit-tracer's JumpReLU; topk does not; "
                    "clt trains a cross-layer transcoder (width and k per layer)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--ct-prompts", type=int, default=2, help="of the prompts, how many circuit-tracer also traces")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 1 circuit-tracer prompt, 1024 eval tokens")
    ap.add_argument("--ct-only", action="store_true", help="redo only the timing / circuit-tracer part, merged "
                    "into the previous run's summary.json")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.ct_prompts, args.eval_tokens = 4, 1, 1024
    torch.set_num_threads(2)
    from featurelens.circuits.graph import attribute
    from featurelens.circuits.interventions import check_graph
    from featurelens.circuits.prune import graph_scores, prune
    from featurelens.circuits.run import GraphConfig, load_transcoders, prompt_ids, run_graph
    from featurelens.models.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ct_only:
        prev = json.loads((out / "summary.json").read_text())
        lm = load_model("smollm2-135m-instruct", device="cpu")
        tcs = load_transcoders(out / "tcs")
        t16, ct = side_by_side(lm, tcs, out, args.ct_prompts)
        prev.update({"seconds_16_tokens": t16, "circuit_tracer": ct})
        prev["targets"].update({"16_tokens<=120s": t16 <= 120, "not_slower_than_circuit_tracer":
                                bool(ct.get("available")) and ct["ratio_ours_over_theirs"][0] <= 1.0})
        (out / "summary.json").write_text(json.dumps(prev))
        print(json.dumps(prev))
        return
    t_train = train(out / "tcs", args.steps, args.width, args.k, args.arch)
    print(f"train: {t_train:.0f} s (0 when already trained)", file=sys.stderr)
    lm = load_model("smollm2-135m-instruct", device="cpu")
    tcs = load_transcoders(out / "tcs")
    rep = replacement_metrics(lm, tcs, args.eval_tokens)
    print(f"replacement: CE {rep['ce_clean']:.3f} -> {rep['ce_replacement']:.3f}, KL {rep['kl_replacement']:.3f}",
          file=sys.stderr)

    rows = []
    for cat, text in PROMPTS[:args.prompts]:
        ids = prompt_ids(lm.tokenizer, text, True)
        g = attribute(lm.model, tcs, ids, progress=False)
        t0 = time.perf_counter()
        p = prune(g)
        rs, cs = graph_scores(g)
        t_prune = time.perf_counter() - t0
        chk = check_graph(lm.model, tcs, g, p.influence)
        row = {"category": cat, "prompt": text, "n_tokens": g.n_pos, "top": lm.tokenizer.decode([int(g.logit_tokens[0])]),
               "p_top": round(float(g.logit_probs[0]), 4), "n_features": g.n_features,
               "pruned_nodes": p.n_nodes, "pruned_edges": p.n_edges, "replacement": round(rs, 4),
               "completeness": round(cs, 4), "seconds": round(g.meta["seconds"] + t_prune, 1),
               "r_total": round(chk.r_total, 3), "r_direct": round(chk.r_direct, 3),
               "top_drop": round(chk.top_drop, 3), "random_drop": round(chk.random_drop, 3),
               "drop_ratio": round(chk.drop_ratio, 2)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    t16, ct = side_by_side(lm, tcs, out, args.ct_prompts)
    # one graph written whole (viewer, JSON, adjacency) for the README
    view = run_graph(GraphConfig(prompt=PROMPTS[0][1], transcoders=str(out / "tcs"), out=str(out / "graph-view")),
                     lm=lm, transcoders=tcs, progress=False)

    def mean(k: str) -> float:
        return round(statistics.fmean(r[k] for r in rows), 4)
    ratios = [r["drop_ratio"] for r in rows if r["drop_ratio"] != float("inf")]
    summary = {
        "model": "smollm2-135m-instruct",
        "train": {"arch": args.arch, "width": args.width, "k": args.k, "skip": args.arch != "clt", "steps": args.steps,
                  "tokens": args.steps * 512, "seconds": round(t_train, 1), "peak_rss_gib": peak_gib(out / "tcs")},
        "fvu": [round(f, 3) for f in rep["fvu"]], "fvu_median": round(statistics.median(rep["fvu"]), 3),
        "ce_clean": round(rep["ce_clean"], 4), "ce_replacement": round(rep["ce_replacement"], 4),
        "kl_replacement": round(rep["kl_replacement"], 4), "eval_tokens": rep["n_tokens"],
        "graphs": len(rows), "replacement_score": mean("replacement"), "completeness_score": mean("completeness"),
        "seconds_per_graph": mean("seconds"), "pruned_nodes": mean("pruned_nodes"), "pruned_edges": mean("pruned_edges"),
        "r_total": mean("r_total"), "r_direct": mean("r_direct"), "top_drop": mean("top_drop"),
        "random_drop": mean("random_drop"), "drop_ratio_median": round(statistics.median(ratios), 2) if ratios else None,
        "drop_ratio_of_means": round(mean("top_drop") / mean("random_drop"), 2) if mean("random_drop") > 0 else None,
        "by_category": {c: {"completeness": round(statistics.fmean(r["completeness"] for r in rows if r["category"] == c), 4),
                            "replacement": round(statistics.fmean(r["replacement"] for r in rows if r["category"] == c), 4)}
                        for c in sorted({r["category"] for r in rows})},
        "seconds_16_tokens": t16, "circuit_tracer": ct, "viewer": view["viewer"],
    }
    summary["targets"] = {
        "kl_replacement<=0.3": summary["kl_replacement"] <= 0.3,
        "completeness>=0.75": summary["completeness_score"] >= 0.75,
        "top10_drop>=3x_random": (summary["drop_ratio_of_means"] or 0) >= 3,
        "16_tokens<=120s": summary["seconds_16_tokens"] <= 120,
        "not_slower_than_circuit_tracer": bool(ct.get("available")) and ct["ratio_ours_over_theirs"][0] <= 1.0,
    }
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.json").write_text(json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
