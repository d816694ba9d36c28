"""Datasets and the input pipeline (needs TFDS, grain and scikit-learn).

Importing this package registers the embedded datasets in ``DATASETS``:
``gapjax_digits`` (scikit-learn's 8x8 digits), ``gapjax_cluttered_digits`` (one digit among
clutter, with box and mask), ``gapjax_multilabel_digits`` (2-4 digits, multi-hot labels,
boxes) and ``gapjax_graph_tasks`` (synthetic graph readout tasks), and the WSOL benchmarks
read from their files (``wsol_cub``, ``wsol_ilsvrc``, ``wsol_openimages``, ``wsol_cub_tfds``;
``gapjax.data.wsol_benchmarks``). Real data prepared offline (docs/datasets.md):
``fashion_mnist`` (its IDX files), ``fashion_canvas`` / ``fashion_mosaic`` (Fashion-MNIST
items on generated canvases), ``image_folder`` (your own images), ``molecules`` (RDKit's
NCI sample as graphs) and ``ogbg_molpcba`` / ``ogbg_molhiv`` (prepared by TFDS). Any other
``config.dataset.name`` is read as a prepared TFDS dataset.

Public API: ``dataset_info(config.dataset)`` and ``make_iterator(config.dataset, split, *,
batch_size, seed, train, process_index=0, process_count=1)``; see ``gapjax.data.pipeline``.
What a model reads from a batch is its task's ``model_inputs`` (``gapjax.tasks``).
"""

from gapjax.data import (
    cluttered_digits,
    digits,
    fashion_canvas,
    fashion_mnist,
    graph_tasks,
    image_folder,
    molecules,
    multilabel_digits,
    ogb,
    wsol_benchmarks,
)
from gapjax.data.pipeline import (
    DatasetError,
    DatasetInfo,
    data_dir,
    dataset_info,
    make_iterator,
    stack_and_pad,
)
from gapjax.data.spec import DATASETS, DatasetSpec, register

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "cluttered_digits",
    "data_dir",
    "dataset_info",
    "digits",
    "fashion_canvas",
    "fashion_mnist",
    "graph_tasks",
    "image_folder",
    "make_iterator",
    "molecules",
    "multilabel_digits",
    "ogb",
    "register",
    "stack_and_pad",
    "wsol_benchmarks",
]
