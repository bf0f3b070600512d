"""SAEDashboard's side of ``benchmarks/browse.py``: run in ``.dash-venv`` (``sae-dashboard`` 0.8 with its own
SAELens and TransformerLens). Loads the same SAE folder (SAELens layout) and SmolLM2 (the converted local
folder, wrapped by TransformerLens), reads the same token ids (``--tokens`` of the default corpus, packed as
featurelens packs them, written by the main venv to a .npy), builds feature-centric dashboards for the first
``--latents`` latents, and prints its time as the last stdout line (JSON)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids_file = out / "tokens.npy"
    if not ids_file.exists():  # the same contexts featurelens browse reads, packed by featurelens itself
        code = ("import numpy as np, sys; from featurelens.data.corpora import iter_texts; "
                "from featurelens.data.tokenize import pack_contexts; from featurelens.models.loading import load_model; "
                "lm = load_model('smollm2-135m-instruct', device='cpu'); "
                f"c = pack_contexts(iter_texts('default', 'all'), lm.tokenizer, 128, n_tokens={args.tokens}); "
                f"np.save({str(ids_file)!r}, c.tokens.astype(np.int64))")
        subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code], check=True)
    tokens = torch.from_numpy(np.load(ids_file))
    torch.set_num_threads(2)
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = next(Path("~/.cache/featurelens/converted").expanduser().glob("SmolLM2-135M-Instruct*"))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = HookedTransformer.from_pretrained_no_processing("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf,
                                                            tokenizer=tok, device="cpu", dtype=torch.float32)
    sae = SAE.load_from_disk(args.sae, device="cpu")
    cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name if hasattr(sae.cfg, "metadata") else sae.cfg.hook_name,
                       features=list(range(args.latents)), minibatch_size_features=min(64, args.latents),
                       minibatch_size_tokens=64, device="cpu", verbose=False)
    t0 = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    save_feature_centric_vis(sae_vis_data=data, filename=str(out / "dashboard.html"))
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": round(secs, 1), "n_latents": args.latents, "n_tokens": int(tokens.numel())}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
