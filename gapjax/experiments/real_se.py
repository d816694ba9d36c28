"""Squeeze-and-Excitation on real images: Fashion-MNIST.

Claim (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018): a channel gate computed
from global context makes a CNN more accurate at next to no cost, and the global context
is what helps: the same gate computed at every pixel from that pixel alone (``local``:
SE's parameters, no squeeze) does not.

Method: this is the ``attention`` study (``gapjax.experiments.attention``) configured for
real data: the cnn (widths 16, 32, 64; one conv per stage) with no gate, SE, or the local
gate after every stage, on ``fashion_mnist`` (60,000 training / 10,000 test images, no
augmentation), AdamW + cosine, every seed trained at once. Differences are paired by seed
(a seed fixes the data order and the shared layers' initialisation). Costs: parameters
per block, forward FLOPs added (XLA's cost analysis), and training step time relative to
none (information only: CPU times on a shared machine).

Decision rule (fixed before running, the attention study's): the claim holds when the
95% paired t-interval of SE - none and of SE - local both lie above zero and SE adds at
most ``attention.FLOPS_LIMIT`` of the backbone's forward FLOPs; it fails when either
interval lies below zero or SE costs more; otherwise it is undecided.

``python -m gapjax.experiments.real_se --out DIR [--full]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gapjax.experiments import attention, common

DATASET = "fashion_mnist"
MEMBERS = ("se", "local")
SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"seeds": 5, "steps": 600, "batch_size": 32, "timing_steps": 5},
    # For a GPU: about 13 epochs at batch 128, ten seeds.
    False: {"seeds": 10, "steps": 6000, "batch_size": 128, "timing_steps": 20},
}
PUBLISHED = (
    ("Hu et al. 2018, Squeeze-and-Excitation Networks, Table 2 (ResNet-50 re-implemented; "
     "also cited in hujie-frank/SENet issue #65)", "ImageNet val, single 224 crop",
     "top-1 error, ResNet-50 -> SE-ResNet-50", "24.80% -> 23.29%"),
    ("Hu et al. 2018, Table 2", "224 x 224 forward", "GFLOPs, ResNet-50 -> SE-ResNet-50",
     "3.86 -> 3.87 (+0.26%)"),
    ("Hu et al. 2018, section 4", "ResNet-50, r = 16", "parameters added",
     "~2.5M (~10%)"),
)


def run(out_dir: Path | str, quick: bool = True, data_dir: Path | str | None = None,
        source_dir: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
    """Runs the attention study on Fashion-MNIST with none / SE / local; writes
    ``real_se.md`` (this section's text, with the published figures), ``real_se.json``
    and ``real_se.png``; returns the report section.
    ``overrides`` replace ``SETTINGS`` entries (``seeds``, ``steps``, ...)."""
    watch = common.Stopwatch()
    out_dir = Path(out_dir)
    settings = common.section_settings("real_se", SETTINGS, quick, overrides)
    section = attention.run(
        out_dir, quick=quick, data_dir=data_dir, dataset=DATASET, members=MEMBERS,
        squeezes=("gap",), name="real_se",
        dataset_options=common.real_dataset_options(data_dir or out_dir / "tfds",
                                                    source_dir), **settings)
    timing = watch.timing()
    se = section["numbers"]["variants"]["se"]
    markdown = "\n\n".join([
        section["markdown"].split("\n\nWhich squeeze", 1)[0],
        "Published figures beside ours (ImageNet, ResNet-50: a far larger network and "
        "task):", common.published_table(PUBLISHED),
        f"Ours: SE adds {se['params_added']:,} parameters and "
        f"{100 * se['flops_share']:.2f}% FLOPs to the cnn. " +
        watch.timing_text(timing)])
    # attention.run wrote real_se.json and the figure; this page replaces its real_se.md.
    return common.write_section(
        out_dir, "real_se", "Real data: Squeeze-and-Excitation",
        claim=section["claim"] + " Measured on Fashion-MNIST.", doc=__doc__,
        markdown=markdown, numbers={**section["numbers"], **timing}, holds=section["holds"],
        verdict=section["verdict"], figures=section["figures"], write_json=False)


if __name__ == "__main__":
    common.experiment_cli(run, __doc__, full_help="longer runs, ten seeds (for a GPU)")
