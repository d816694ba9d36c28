"""Datasets and the input pipeline (needs TFDS, grain and scikit-learn): ``dataset_info``,
``make_iterator`` (``pipeline``) and the ``DATASETS`` registry (``spec``). Importing the
package registers the embedded datasets (``gapjax_digits``, ``gapjax_cluttered_digits``,
``gapjax_multilabel_digits``, ``gapjax_graph_tasks``), the WSOL benchmarks (``wsol_cub``,
...; ``wsol_benchmarks``) and real data prepared offline (docs/datasets.md:
``fashion_mnist``, ``fashion_canvas``, ``fashion_mosaic``, ``image_folder``, ``molecules``,
``ogbg_molpcba``, ``ogbg_molhiv``); any other ``config.dataset.name`` is a prepared TFDS
dataset.
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
