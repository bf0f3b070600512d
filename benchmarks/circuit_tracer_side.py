"""circuit-tracer's side of ``benchmarks/circuits.py``: run in ``.ct-venv`` (circuit-tracer 0.5, nnsight 0.7,
transformers 4.57.3). Loads a transcoder set in its layout and a local model folder, times its
``attribute`` on given token ids (model loading excluded), and writes the graph's tensors to a
safetensors file (no pickle) for the comparison. Last stdout line JSON."""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="local HF folder that transformers 4.57 reads")
    ap.add_argument("--transcoders", required=True, help="folder in circuit-tracer's layout")
    ap.add_argument("--ids", required=True, help="JSON list of lists of token ids")
    ap.add_argument("--out", required=True, help="output prefix: {out}{i}.safetensors per prompt")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    import yaml
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    cfg = yaml.safe_load(open(f"{args.transcoders}/config.yaml"))
    n = len([k for k in __import__("os").listdir(args.transcoders) if k.startswith("layer_") and k.endswith(".safetensors")])
    if cfg["model_kind"] == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        tcs = load_clt(args.transcoders, feature_input_hook=cfg["feature_input_hook"],
                       feature_output_hook=cfg["feature_output_hook"], scan=str(cfg["scan"]), device=torch.device("cpu"),
                       dtype=torch.float32, lazy_decoder=False)
    else:
        tcs = load_transcoder_set({i: f"{args.transcoders}/layer_{i}.safetensors" for i in range(n)}, scan=str(cfg["scan"]),
                              feature_input_hook=cfg["feature_input_hook"], feature_output_hook=cfg["feature_output_hook"],
                              device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    rm = ReplacementModel.from_pretrained_and_transcoders(args.model, tcs, backend="nnsight", device="cpu",
                                                          dtype=torch.float32)
    times = []
    for i, ids in enumerate(json.loads(args.ids)):
        t0 = time.perf_counter()
        g = attribute(torch.tensor(ids), rm, max_n_logits=10, desired_logit_prob=0.95, batch_size=args.batch_size)
        times.append(time.perf_counter() - t0)
        save_file({"adjacency": g.adjacency_matrix.contiguous(), "active_features": g.active_features.contiguous(),
                   "activations": g.activation_values.contiguous(),
                   "logit_tokens": torch.tensor([t.vocab_idx for t in g.logit_targets]),
                   "logit_probs": g.logit_probabilities.contiguous()}, f"{args.out}{i}.safetensors")
    print(json.dumps({"seconds": times}))


if __name__ == "__main__":
    main()
