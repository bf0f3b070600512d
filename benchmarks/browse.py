"""The feature browser on the demo SAE (SmolLM2-135M-Instruct, blocks.10.hook_resid_post, TopK 4096 latents),
2 CPU cores: build every latent's pages over --tokens tokens of the default corpus (seconds, peak memory,
size on disk); SAEDashboard (``sae-dashboard`` 0.8, ``.dash-venv``, ``benchmarks/saedashboard_side.py``) on the
same SAE and tokens for --dash-latents latents, per latent against ours; then autointerp of --explain latents
with the bundled explainer and scorer, beside the random-explanation baseline.

    .venv/bin/python benchmarks/browse.py [--sae runs/demo/saes/topk-w4096-k32] [--tokens 1000000] [--out /tmp/bench_browse]

Without the demo SAE it runs ``featurelens demo`` first. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FL = str(ROOT / ".venv/bin/featurelens")


def timed(cmd: list[str], log: Path, **kw: Any) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (GiB), exit status and stdout of a command (stderr to ``log``)."""
    t0 = time.perf_counter()
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, **kw)
        _, status, usage = os.wait4(proc.pid, 0)
    return (time.perf_counter() - t0, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status),
            log.with_suffix(".out").read_text())


def stage(out: Path, name: str, key: dict[str, Any], fn: Any) -> Any:
    """``fn()``'s result, or the one a previous run of this benchmark saved for the same ``key`` (so a rerun
    with more steps, e.g. ``--explain``, does not redo and retime the stages before it)."""
    f = out / "stages" / f"{name}.json"
    if f.is_file():
        rec = json.loads(f.read_text())
        if rec.get("key") == key:
            print(f"{name}: reusing {f}", file=sys.stderr)
            return rec["result"]
    res = fn()
    f.parent.mkdir(exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": res}, indent=1))
    tmp.replace(f)
    return res


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=str(ROOT / "runs/demo/saes/topk-w4096-k32"))
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--out", default="/tmp/bench_browse")
    ap.add_argument("--dash-latents", type=int, default=64,
                    help="latents SAEDashboard builds (one of its default feature batches: it reruns the model per batch)")
    ap.add_argument("--dash-tokens", type=int, default=200_000,
                    help="tokens SAEDashboard reads (0: --tokens); ours is timed on the same tokens too, for the ratio")
    ap.add_argument("--explain-threads", type=int, default=2, help="torch threads of the autointerp step (not timed)")
    ap.add_argument("--explain", type=int, default=200, help="latents autointerp explains and scores")
    ap.add_argument("--quick-sae", type=int, default=0, help="without the demo SAE: train one of its shape for this many "
                    "steps instead of running the demo (0: run the demo)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    sae = Path(args.sae)
    sae_source = "demo"
    if not (sae / "cfg.json").is_file() and args.quick_sae:
        # the browser's cost hardly depends on how well the SAE is trained: the same shape, trained briefly
        sae, sae_source = out / "sae" / "topk-w4096-k32", f"streamed, {args.quick_sae} steps of 4096 rows"
        if not (sae / "cfg.json").is_file():
            subprocess.run([FL, "train", "--model", "smollm2-135m-instruct", "--site", "blocks.10.hook_resid_post",
                            "--arch", "topk", "--width", "4096", "--k", "32", "--steps", str(args.quick_sae),
                            "--batch-size", "4096", "--out", str(out / "sae")], check=True, env=env, stdout=subprocess.DEVNULL)
    elif not (sae / "cfg.json").is_file():
        print("no demo SAE: running featurelens demo first", file=sys.stderr)
        subprocess.run([FL, "demo", "--out", str(ROOT / "runs/demo")], check=True, env=env, stdout=subprocess.DEVNULL)
    folder = out / "browser"

    def run_ours() -> dict[str, Any]:
        secs, peak, rc, _ = timed([FL, "browse", str(sae), "--tokens", str(args.tokens), "--split", "all", "--out", str(folder)],
                                  out / "browse.log", env=env)
        if rc != 0:
            raise SystemExit(f"featurelens browse failed: see {out / 'browse.log'}")
        d = json.loads((folder / "summary.json").read_text())["dictionaries"][0]
        return {"seconds": round(secs, 1), "peak_rss_gib": round(peak, 2), "disk_mib": round(du(folder) / 2**20, 1),
                "n_latents": d["n_latents"], "n_tokens": d["n_tokens"], "dead": d["dead"],
                "seconds_activations": d["seconds_activations"], "seconds_pages": d["seconds_pages"],
                "seconds_per_latent": round(secs / d["n_latents"], 4), "index": d["index"]}

    ours = stage(out, "ours", {"sae": str(sae), "tokens": args.tokens}, run_ours)
    print(json.dumps({"ours": ours}), file=sys.stderr)
    py = ROOT / ".dash-venv/bin/python"
    n_tok = args.dash_tokens or args.tokens

    def run_dash() -> dict[str, Any]:
        if not py.exists():
            return {"available": False,
                    "error": ".dash-venv is missing (benchmarks/setup_peers.sh makes it)"}
        s2, rss2, rc2, o2 = timed([str(py), str(ROOT / "benchmarks/saedashboard_side.py"), "--sae", str(sae), "--tokens",
                                   str(n_tok), "--latents", str(args.dash_latents), "--out", str(out / "saedashboard")],
                                  out / "saedashboard.log", env=env)
        if rc2 != 0:
            lines = (out / "saedashboard.log").read_text().strip().splitlines() or ["failed"]
            return {"available": False, "error": lines[-1][:300]}
        side = json.loads(o2.strip().splitlines()[-1])
        per = side["seconds"] / side["n_latents"]
        same = ours
        if n_tok != args.tokens:  # ours on SAEDashboard's tokens, so the ratio compares equal work
            s4, rss4, rc4, _ = timed([FL, "browse", str(sae), "--tokens", str(n_tok), "--split", "all", "--out",
                                      str(out / "browser_same_tokens")], out / "browse_same.log", env=env)
            if rc4 != 0:
                raise SystemExit(f"featurelens browse failed: see {out / 'browse_same.log'}")
            same = {"seconds": round(s4, 1), "peak_rss_gib": round(rss4, 2), "n_tokens": n_tok,
                    "seconds_per_latent": round(s4 / ours["n_latents"], 4)}
        return {"available": True, **side, "wall_seconds": round(s2, 1), "peak_rss_gib": round(rss2, 2),
                "seconds_per_latent": round(per, 3), "ours_on_same_tokens": same,
                "ours_faster_per_latent": round(per / same["seconds_per_latent"], 1)}

    dash = stage(out, "saedashboard", {"sae": str(sae), "tokens": n_tok, "latents": args.dash_latents}, run_dash)
    print(json.dumps({"saedashboard": dash}), file=sys.stderr)

    def run_explain() -> dict[str, Any]:
        if args.explain <= 0:
            return {"skipped": True}
        s3, _, rc3, o3 = timed([FL, "explain", str(Path(ours["index"]).parent), "--latents", str(args.explain)],
                               out / "explain.log", env={**env, "OMP_NUM_THREADS": str(args.explain_threads)})
        auto: dict[str, Any] = json.loads(o3.strip().splitlines()[-1]) if rc3 == 0 else {"error": f"see {out / 'explain.log'}"}
        auto["seconds"] = round(s3, 1)
        return auto

    auto = stage(out, "explain", {"index": ours["index"], "latents": args.explain}, run_explain)
    result = {"sae": str(sae), "sae_source": sae_source, "tokens": args.tokens, "ours": ours, "saedashboard": dash, "autointerp": auto,
              "targets": {"all_latents<=15min": ours["seconds"] <= 900,
                          ">=5x_faster_per_latent_than_saedashboard": bool(dash.get("available"))
                          and dash["ours_faster_per_latent"] >= 5}}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
