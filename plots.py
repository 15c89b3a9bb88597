"""Plots of a training run, drawn from the files the run leaves in its directory.

`python eval.py --plots RUN_DIR` redraws them; train.py draws them at the end of a run. matplotlib
is optional: without it, nothing is drawn and one line says so.
"""
import json
from pathlib import Path

from errors import CheckpointError, reading
from files import write_atomic

RUN_DIR_FIX = "is it the --out-dir of a train.py run? delete the file or train again to rewrite it"


def write_plots(run_dir) -> list[Path]:
    """Draw the PNGs of a training run into RUN_DIR/plots from the files the run left in RUN_DIR.

      loss_curves.png  task loss, L2 and L3 per step                    from history.json
      delta_sigma.png  the learned Δσ (kasa_sigma), layers × r          from adapter.safetensors
                       (the paper's figure 5)
      spectrum.png     kept vs dropped singular values of the layers
                       whose truncation cost the most loss              from truncation_report.json
      validation.png   --eval-every's scores against the step           from history.json
                       (E2E: validation loss, greedy BLEU, ...; GLUE: dev metrics)
    A plot whose input is missing is skipped with a one-line message (validation.png: silently
    when the run did not validate). Returns the written paths.
    """
    try:
        from matplotlib.figure import Figure       # no pyplot: no GUI backend, no global state
    except ImportError:
        print("matplotlib is not installed: skipped the plots (loss curves, Δσ heat map, spectrum); "
              "`pip install matplotlib`, then `python eval.py --plots RUN_DIR` draws them")
        return []
    run_dir = Path(run_dir)
    written = []
    for name, source, load, draw in [("loss_curves.png", "history.json", _load_json, _plot_loss_curves),
                                     ("delta_sigma.png", "adapter.safetensors", _load_sigma, _plot_delta_sigma),
                                     ("spectrum.png", "truncation_report.json", _load_json, _plot_spectrum),
                                     ("validation.png", "history.json", _load_validation, _plot_validation)]:
        if not (run_dir / source).is_file():
            if name != "validation.png":  # a missing history.json is reported once, for loss_curves.png
                print(f"skipped {name}: {run_dir / source} does not exist")
            continue
        with reading(run_dir / source, CheckpointError, RUN_DIR_FIX):
            content = load(run_dir / source)
        if name == "validation.png" and not content:
            continue  # trained without --eval-every
        figure = Figure(layout="constrained")
        draw(figure, content, run_dir / source)
        written.append(write_atomic(run_dir / "plots" / name, lambda f: figure.savefig(f, format="png", dpi=120)))
    return written


def _load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _load_validation(history_path: Path) -> list:
    """(step, scores) of every history entry that holds --eval-every's validation scores."""
    return [(entry["step"], entry["validation"]) for entry in _load_json(history_path) if "validation" in entry]


def _load_sigma(adapter_path: Path) -> dict:
    """Each layer's learned Δσ (its kasa_sigma), as numpy arrays."""
    from safetensors import safe_open
    with safe_open(adapter_path, framework="numpy") as f:
        return {key.removesuffix(".kasa_sigma"): f.get_tensor(key) for key in f.keys() if key.endswith(".kasa_sigma")}


def _plot_loss_curves(figure, history: list, history_path: Path):
    import numpy as np
    if not history:
        raise CheckpointError(f"{history_path} holds no steps: did the run train at all?")
    steps = np.array([entry["step"] for entry in history])
    figure.set_size_inches(13, 3.5)
    panels = [("loss", "task loss"), ("l2", r"$L_2 = \sum\,\|\Delta\sigma\|^2$"),
              ("l3", r"$L_3 = \sum\,\|B^\top B - I\|^2 + \|AA^\top - I\|^2$")]
    for axes, (key, title) in zip(figure.subplots(1, 3), panels):
        values = np.array([entry[key] for entry in history], dtype=float)
        window = len(values) // 50                 # per-step values are noisy: add a running mean
        axes.plot(steps, values, lw=0.8, alpha=0.35 if window > 1 else 1.0)
        if window > 1:
            axes.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, "valid"),
                      lw=1.5, color="tab:blue", label=f"mean of {window} steps")
            axes.legend()
        axes.set(title=title, xlabel="step")


def _plot_validation(figure, points: list, history_path: Path):
    """One panel per validation score (every number but the seconds it took and the count of MRs)."""
    names = [k for k, v in points[-1][1].items() if isinstance(v, (int, float)) and k not in ("seconds", "eval_mrs")]
    figure.set_size_inches(1 + 3.2 * len(names), 3.2)
    figure.suptitle("validation during training (the unmerged model; data the run does not train on)")
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        steps = [step for step, scores in points if scores.get(name) is not None]
        axes.plot(steps, [scores[name] for _, scores in points if scores.get(name) is not None], "o-", ms=4)
        axes.set(title=name, xlabel="step")


def _plot_delta_sigma(figure, sigma: dict, adapter_path: Path):
    """One heat map per projection kind (q_proj, v_proj, ...): a row per layer, a column per Δσ_i."""
    import numpy as np
    if not sigma:
        raise CheckpointError(f"{adapter_path} holds no '<layer>.kasa_sigma' tensors: is it a kasa_state_dict?")
    by_kind = {}
    for name in sorted(sigma, key=_layer_order):
        by_kind.setdefault(name.rpartition(".")[2], []).append(name)
    rows = max(len(names) for names in by_kind.values())
    r = max(len(values) for values in sigma.values())
    figure.set_size_inches(1.5 + len(by_kind) * (1.2 + 0.35 * r), 1.2 + 0.16 * rows)
    limit = max(float(np.abs(values).max()) for values in sigma.values())
    panels = figure.subplots(1, len(by_kind), squeeze=False)[0]
    for axes, (kind, names) in zip(panels, sorted(by_kind.items())):
        grid = np.full((len(names), r), np.nan)
        for row, name in enumerate(names):
            grid[row, :len(sigma[name])] = sigma[name]
        image = axes.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        axes.set_yticks(range(len(names)), [_short_layer_name(name) for name in names], fontsize=7)
        axes.set_xticks(range(r), [str(i + 1) for i in range(r)])
        axes.set(title=rf"$\Delta\sigma$ of {kind}", xlabel="i")
    figure.colorbar(image, ax=panels, label=r"$\Delta\sigma_i$")


def _plot_spectrum(figure, report: dict, report_path: Path, worst: int = 4):
    """The singular values of the layers that lost the most, kept (line) and dropped (dots)."""
    rows = report["layers"][:worst]                # the report lists the worst layers first
    figure.set_size_inches(1 + 3.6 * len(rows), 3.4)
    figure.suptitle(f"loss {report['loss_original']:.3f} (original) -> {report['loss_truncated']:.3f} "
                    "(truncated); Δloss: this layer truncated alone")
    for axes, row in zip(figure.subplots(1, len(rows), squeeze=False)[0], rows):
        kept, dropped = row["kept_sigma"], row["dropped_sigma"]
        axes.semilogy(range(1, len(kept) + 1), kept, lw=1.2, label="kept (W_world)")
        axes.semilogy(range(len(kept) + 1, len(kept) + len(dropped) + 1), dropped, "o", ms=4,
                      color="tab:red", label=f"dropped ({len(dropped)}): {100 * row['energy_share']:.2g}% of ‖W‖²")
        axes.set(title=f"{_short_layer_name(row['name'])}: Δloss {row['delta_loss']:+.3f}", xlabel="i",
                 ylabel=r"$\sigma_i$")
        axes.legend(fontsize=8)


def _layer_order(name: str):
    """Block number first, so that blocks.10 comes after blocks.9."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return (numbers[-1] if numbers else -1, name)


def _short_layer_name(name: str) -> str:
    """'blocks.12.attn.v_proj' -> '12.v_proj'."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return f"{numbers[-1]}.{name.rpartition('.')[2]}" if numbers else name

