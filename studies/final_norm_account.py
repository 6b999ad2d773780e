"""Why the hf convention's last step is large on SmolLM2: which dimensions of h_{L−1}, of the final norm's gain and
of the head carry D(h_{L−1}, FinalNorm(h_{L−1})), the norm floor under D_L(hf).

    python -m studies.final_norm_account --model base=results/models/smollm2-135m/base \\
        --model distilled=results/models/smollm2-135m/distilled --passages 200 --out docs/findings/final_norm

On the first N LAMBADA passages, every token but each passage's first (the attention sink), for each model:
- the cosine between h = h_{L−1} and FinalNorm(h) = g ⊙ h / rms(h) is a sum over dimensions of
  g_i h_i² / (‖h‖ ‖g ⊙ h‖) (the rms cancels); each dimension's term (mean over tokens; the terms sum to the mean
  cosine exactly), its share h_i² / ‖h‖² of the state's squared norm, and its gain g_i: ``dimensions.csv``;
- the largest dimension's share of ‖h_l‖² at every layer l: ``layers.csv``;
- per model (``summary.csv``/``.md``): the norm floor D = (1 − cos) / 2, what it would be with that dimension's gain
  made positive and with the dimension left out, D_L under both conventions, and the head's view of the dimension:
  how often the output's top-1 token stays the same when the normalised h_L's value there is held at its mean over
  tokens (a constant, so only a bias on the logits), and the mean KL that costs.
The figure is drawn from the CSVs it has just written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import SHARED

HEAD_CHUNK = 512  # tokens per head product (a 512 × 49,152 logit block)


def passages(path: Path, count: int) -> list[str]:
    from hsconv.texts import read_texts

    return read_texts("lambada", "lambada", str(path))[0][:count]


def states_of(loaded, texts: list[str]) -> dict[str, torch.Tensor]:
    """Every layer's state (float64), the pre-norm and normalised h_L, for every token but each text's first."""
    from hsconv.readout import decoder_states

    layers, pre_norm, normed = [], [], []
    with torch.no_grad():
        for text in texts:
            ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
            result = decoder_states(loaded.model, ids, None)
            layers.append(torch.stack([state[0, 1:] for state in result["states"][:-1]]).double())
            pre_norm.append(result["pre_norm_last"][0, 1:].double())
            normed.append(result["states"][-1][0, 1:].double())
    return {"layers": torch.cat(layers, dim=1), "pre_norm_last": torch.cat(pre_norm), "normed_last": torch.cat(normed)}


def cosine_terms(h: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Per token and dimension, g_i h_i² / (‖h‖ ‖g ⊙ h‖): the terms of cos(h, g ⊙ h / rms(h)) (tokens × d)."""
    return gain * h.square() / (h.norm(dim=-1, keepdim=True) * (gain * h).norm(dim=-1, keepdim=True))


def floor(cosine: torch.Tensor) -> float:
    return float(((1 - cosine) / 2).mean())


def head_bias_check(normed: torch.Tensor, head: torch.nn.Module, dimension: int) -> tuple[float, float]:
    """(top-1 agreement, mean KL(real ‖ held)) when the normalised h_L's ``dimension`` is held at its mean."""
    held = normed.clone()
    held[:, dimension] = normed[:, dimension].mean()
    agree, kl = 0, 0.0
    weight = head.weight.detach().float()
    bias = None if head.bias is None else head.bias.detach().float()
    for start in range(0, len(normed), HEAD_CHUNK):
        real, fixed = (torch.nn.functional.linear(x[start:start + HEAD_CHUNK].float(), weight, bias).log_softmax(-1)
                       for x in (normed, held))
        agree += int((real.argmax(-1) == fixed.argmax(-1)).sum())
        kl += float((real.exp() * (real - fixed)).sum(dtype=torch.float64))
    return agree / len(normed), kl / len(normed)


def account(name: str, model_dir: str, texts: list[str], dimension: int | None) -> tuple[dict, pd.DataFrame,
                                                                                           pd.DataFrame]:
    """One model's summary row, per-dimension table and per-layer table; ``dimension`` None picks the largest."""
    from hsconv.hidden_states import movement
    from hsconv.readout import readout
    from hsconv.models import load_model

    loaded = load_model(model_dir)
    read = readout(loaded.model)
    gain = read.final_norm.weight.detach().double()
    states = states_of(loaded, texts)
    h = states["layers"][-1]  # h_{L−1}
    share = (h.square() / h.square().sum(-1, keepdim=True)).mean(0)
    dimension = int(share.argmax()) if dimension is None else dimension
    terms = cosine_terms(h, gain)
    flipped = gain.clone()
    flipped[dimension] = flipped[dimension].abs()
    others = torch.arange(h.shape[-1]) != dimension
    agreement, kl = head_bias_check(states["normed_last"], read.head, dimension)
    row = {"model": name, "tokens": len(h), "dimension": dimension, "gain": float(gain[dimension]),
           "share_of_squared_norm": float(share[dimension]), "cosine_term": float(terms[:, dimension].mean()),
           "cosine": float(terms.sum(-1).mean()), "norm_floor": floor(terms.sum(-1)),
           "norm_floor_gain_made_positive": floor(cosine_terms(h, flipped).sum(-1)),
           "norm_floor_without_dimension": floor(cosine_terms(h[:, others], gain[others]).sum(-1)),
           "last_layer_movement_hf": float(movement(h, states["normed_last"]).mean()),
           "last_layer_movement_pre_norm": float(movement(h, states["pre_norm_last"]).mean()),
           "top1_unchanged_when_held": agreement, "kl_when_held": kl}
    dimensions = pd.DataFrame({"model": name, "dimension": np.arange(h.shape[-1]), "gain": gain.numpy(),
                               "share_of_squared_norm": share.numpy(), "cosine_term": terms.mean(0).numpy()})
    layer_share = (states["layers"].square()[..., dimension] / states["layers"].square().sum(-1)).mean(-1)
    layers = pd.DataFrame({"model": name, "layer": np.arange(len(layer_share)), "dimension": dimension,
                           "share_of_squared_norm": layer_share.numpy()})
    return row, dimensions, layers


def plot(summary: pd.DataFrame, dimensions: pd.DataFrame, layers: pd.DataFrame, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, frame in layers.groupby("model", sort=False):
        left.plot(frame["layer"], frame["share_of_squared_norm"], marker="o", markersize=3, label=name)
    dimension = int(summary["dimension"].iloc[0])
    left.set(xlabel="layer l (0 = embeddings)", ylabel=f"share of ‖h_l‖² in dimension {dimension}",
             title="a massive dimension in the residual stream", ylim=(0, 1))
    left.legend(title="model")
    first = dimensions[dimensions["model"] == summary["model"].iloc[0]]
    top = first.reindex(first["cosine_term"].abs().sort_values(ascending=False).index)[:8]["dimension"].tolist()
    width = 0.8 / dimensions["model"].nunique()
    for number, (name, frame) in enumerate(dimensions.groupby("model", sort=False)):
        frame = frame.set_index("dimension").loc[top]
        right.bar(np.arange(len(top)) + number * width, frame["cosine_term"], width, label=name)
    gains = first.set_index("dimension").loc[top, "gain"]
    right.set_xticks(np.arange(len(top)) + width * (dimensions["model"].nunique() - 1) / 2,
                     [f"{d}\ng={g:.2f}" for d, g in zip(top, gains)], fontsize=8)
    right.axhline(0, color="black", linewidth=0.8)
    right.set(xlabel="dimension i of h_{L−1} (final-norm gain g_i)",
              ylabel="term g_i h_i² / (‖h‖ ‖g⊙h‖), mean over tokens",
              title="cos(h_{L−1}, FinalNorm(h_{L−1})) by dimension")
    right.legend(title="model")
    figure.suptitle(title)
    figure.tight_layout()
    for suffix in (".pdf", ".png"):
        figure.savefig(out.with_suffix(suffix), dpi=150)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR (prepared by hsconv)")
    parser.add_argument("--passages", type=int, default=200, help="the first N LAMBADA test passages")
    parser.add_argument("--lambada", default=str(SHARED / "lambada_test.jsonl"))
    parser.add_argument("--out", required=True, help="folder for the CSVs, the Markdown summary and the figure")
    parser.add_argument("--title", default="SmolLM2-135M-Instruct: the final norm and its massive dimension")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSVs in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(*(pd.read_csv(out / f"{name}.csv") for name in ("summary", "dimensions", "layers")), out / "final_norm",
             args.title)
        return
    texts = passages(Path(args.lambada), args.passages)
    rows, dimension_tables, layer_tables, dimension = [], [], [], None
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        row, dimensions, layers = account(name, model_dir, texts, dimension)
        dimension = row["dimension"]  # the first model's, for every model
        rows.append(row), dimension_tables.append(dimensions), layer_tables.append(layers)
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary.to_markdown(index=False, floatfmt=".4g") + "\n")
    pd.concat(dimension_tables).to_csv(out / "dimensions.csv", index=False)
    pd.concat(layer_tables).to_csv(out / "layers.csv", index=False)
    plot(pd.read_csv(out / "summary.csv"), pd.read_csv(out / "dimensions.csv"), pd.read_csv(out / "layers.csv"),
         out / "final_norm", args.title)
    print(summary.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
