"""A builder chosen at run time, behind the pipeline's builder interface.

The pipeline (``gapjax.data.pipeline.prepare_embedded``) uses a ``DatasetSpec``'s
``builder_class`` through a small interface: ``builder_class(config=, data_dir=,
file_format=)``, ``builder_configs``, ``is_prepared()``, ``download_and_prepare()``,
``as_data_source(split)``, ``info``, ``name``, ``builder_config`` and ``data_dir``.
``WrappedBuilder`` implements it around a TFDS builder that a subclass picks when it is
constructed (the project's own ArrayRecord files, or a TFDS dataset prepared elsewhere),
and adds the config's preprocessing choices to every example it reads
(``AnnotatedSource``), since a spec's ``preprocess`` sees only the example. The
config's ``name`` keys the pipeline's cache, so it must spell out every such choice and
be usable in a file name (the build lock is named after it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class AnnotatedSource(Sequence):
    """``source`` (a random-access data source) with ``extra`` added to every example.

    Keeps the batched lookup (``__getitems__``) of ArrayRecord sources.
    """

    def __init__(self, source: Sequence, extra: Mapping[str, Any]):
        self.source = source
        self.extra = dict(extra)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[index], **self.extra}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        read_many = getattr(self.source, "__getitems__", None)
        examples = None
        if read_many is not None:
            try:
                examples = list(read_many(list(indices)))
            except TypeError:  # tfds.testing.mock_data's stand-in cannot be called
                examples = None
        if examples is None:
            examples = [self.source[index] for index in indices]
        return [{**example, **self.extra} for example in examples]


class WrappedBuilder:
    """The pipeline's builder interface over ``self.inner``, a TFDS builder.

    Subclasses set ``self.inner`` in ``__init__`` (after calling this one) and may override
    ``extra_fields`` (what every example gains) and add ``num_classes`` / ``eval_split``
    for specs that leave them to the builder.
    """

    builder_configs: ClassVar[dict] = {}

    def __init__(self, config: Any, data_dir: str, file_format: str = "array_record"):
        del file_format  # always ArrayRecord: grain reads it by random access
        self.builder_config = config
        self.data_dir = data_dir
        self.inner: Any = None

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def info(self) -> Any:
        return self.inner.info

    def is_prepared(self) -> bool:
        return bool(self.inner.is_prepared())

    def download_and_prepare(self) -> None:
        self.inner.download_and_prepare()

    def extra_fields(self, split: str) -> dict[str, Any]:
        """Fields added to every example of ``split`` (names end in ``_`` by convention)."""
        del split
        return {}

    def as_data_source(self, split: str) -> Sequence:
        source = self.inner.as_data_source(split=split)
        extra = self.extra_fields(split)
        return AnnotatedSource(source, extra) if extra else source


__all__ = ["AnnotatedSource", "WrappedBuilder"]
