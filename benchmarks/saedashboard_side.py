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
    ids_file, ref_file = out / "tokens.npy", out / "ref_logits.npy"
    if not ids_file.exists() or not ref_file.exists():  # the same contexts featurelens browse reads, packed by featurelens
        code = ("import numpy as np, torch; from featurelens.data.corpora import iter_texts; "
                "from featurelens.data.tokenize import pack_contexts; from featurelens.models.loading import load_model; "
                "lm = load_model('smollm2-135m-instruct', device='cpu'); "
                f"c = pack_contexts(iter_texts('default', 'all'), lm.tokenizer, 128, n_tokens={args.tokens}); "
                f"np.save({str(ids_file)!r}, c.tokens.astype(np.int64)); "
                "ids = torch.from_numpy(c.tokens[:2].astype(np.int64)); "
                "ref = lm.model(input_ids=ids).logits[:, -8:].detach().numpy(); "
                f"np.save({str(ref_file)!r}, ref)")
        subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code], check=True)
    tokens = torch.from_numpy(np.load(ids_file))
    torch.set_num_threads(2)
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    # TransformerLens 2.17 has no SmolLM2 entry, and this venv's transformers 4.x misreads the converted folder's
    # 5.x rope settings, so the HookedTransformer is configured by hand from the folder's config.json (a Llama)
    # and given the weights; its logits are checked against featurelens' own HF forward below.
    folder = next(Path("~/.cache/featurelens/converted").expanduser().glob("SmolLM2-135M-Instruct*"))
    hc = json.loads((folder / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   **{k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if tc.get(k)})
    fast.save_pretrained(out / "tokenizer")  # a folder this transformers can reopen (TransformerLens does)
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    rope = (hc.get("rope_parameters") or {}).get("rope_theta", hc.get("rope_theta", 10000.0))
    cfg_tl = HookedTransformerConfig(
        d_model=hc["hidden_size"], d_head=hc["head_dim"], n_heads=hc["num_attention_heads"],
        n_key_value_heads=hc["num_key_value_heads"], d_mlp=hc["intermediate_size"], n_layers=hc["num_hidden_layers"],
        n_ctx=2048, eps=hc["rms_norm_eps"], d_vocab=hc["vocab_size"], act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=hc["head_dim"], rotary_base=rope, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, dtype=torch.float32, device="cpu")
    model = HookedTransformer(cfg_tl, tokenizer=tok)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg_tl), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    del hf
    with torch.no_grad():
        ours = model(tokens[:2])[:, -8:].numpy()
    logit_diff = float(np.abs(ours - np.load(ref_file)).max())
    if logit_diff > 1e-2:
        raise SystemExit(f"the HookedTransformer differs from the HF model (max logit difference {logit_diff:.3g})")
    sae = SAE.load_from_disk(args.sae, device="cpu")
    norms = sae.W_dec.detach().norm(dim=-1)
    if float(norms.std() / norms.mean()) < 1e-5:
        # every decoder row has the same norm (our unit rows times the folded input scale), so folding scales all
        # pre-activations alike and keeps the top k: safe, though SAELens 6 refuses it for every TopK SAE
        sae.fold_W_dec_norm = super(type(sae), sae).fold_W_dec_norm  # type: ignore[method-assign]
    cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name if hasattr(sae.cfg, "metadata") else sae.cfg.hook_name,
                       features=list(range(args.latents)), minibatch_size_features=min(64, args.latents),
                       minibatch_size_tokens=64, device="cpu", verbose=False)
    t0 = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    save_feature_centric_vis(sae_vis_data=data, filename=str(out / "dashboard.html"))
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": round(secs, 1), "n_latents": args.latents, "n_tokens": int(tokens.numel()),
                      "max_logit_difference_to_hf": logit_diff}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
